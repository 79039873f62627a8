//! Dataset preparation on real image files: formats, EXIF, colour models, captions,
//! crops, buckets, the report, and every kind of bad input.

use std::path::{Path, PathBuf};

use dreambooth_api::spec::{Captions, Crop, Dataset};
use dreambooth_trainer::data::{DataError, ImageProblem, prepare};
use image::{ImageFormat, Rgb, RgbImage};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/images")
        .join(name)
}

fn dataset(resolution: u32) -> Dataset {
    Dataset {
        resolution,
        ..Dataset::default()
    }
}

/// A photo-like test image: a gradient with a bright square.
fn photo(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        if x > width / 3 && x < width / 2 && y > height / 3 && y < height / 2 {
            Rgb([250, 240, 230])
        } else {
            Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, 90])
        }
    })
}

fn save(dir: &Path, name: &str, image: &RgbImage, format: ImageFormat) {
    image.save_with_format(dir.join(name), format).unwrap();
}

/// Five good images in the four accepted formats.
fn good_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    save(
        dir.path(),
        "sksper (1).jpg",
        &photo(120, 90),
        ImageFormat::Jpeg,
    );
    save(
        dir.path(),
        "sksper (2).png",
        &photo(90, 120),
        ImageFormat::Png,
    );
    save(
        dir.path(),
        "sksper 3.webp",
        &photo(100, 100),
        ImageFormat::WebP,
    );
    save(
        dir.path(),
        "sksper-(4).bmp",
        &photo(80, 64),
        ImageFormat::Bmp,
    );
    save(dir.path(), "sksper_5.png", &photo(64, 80), ImageFormat::Png);
    dir
}

#[test]
fn every_accepted_format_is_read_captioned_and_resized() {
    let dir = good_folder();
    let prepared = prepare(dir.path(), &dataset(64)).unwrap();
    assert_eq!(prepared.images.len(), 5);
    for image in &prepared.images {
        assert_eq!(image.caption, "sksper", "{}", image.file);
        assert_eq!(image.pixels.dimensions(), (64, 64));
    }
    let files: Vec<&str> = prepared.images.iter().map(|i| i.file.as_str()).collect();
    assert_eq!(
        files,
        [
            "sksper (1).jpg",
            "sksper (2).png",
            "sksper 3.webp",
            "sksper-(4).bmp",
            "sksper_5.png"
        ]
    );
    let report = &prepared.report;
    assert_eq!(report.images[0].width, 120);
    assert_eq!(report.images[0].sha256.len(), 64);
    assert!(report.skipped.is_empty() && report.duplicates.is_empty());
    // 5 images: no "too few" warning, but the hint towards 10-20.
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(report.warnings[0].contains("10-20"));
}

#[test]
fn exif_orientation_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("exif_rotate90.jpg"), dir.path().join("sksper.jpg")).unwrap();
    let prepared = prepare(
        dir.path(),
        &Dataset {
            buckets: true,
            ..dataset(256)
        },
    )
    .unwrap();
    let report = &prepared.report.images[0];
    assert_eq!(
        (report.width, report.height),
        (16, 32),
        "stored 32x16, shown upright 16x32"
    );
    let pixels = &prepared.images[0].pixels;
    let top = pixels.get_pixel(pixels.width() / 2, 2).0;
    let bottom = pixels.get_pixel(pixels.width() / 2, pixels.height() - 3).0;
    assert!(top[0] > 200 && top[2] < 60, "top should be red: {top:?}");
    assert!(
        bottom[2] > 200 && bottom[0] < 60,
        "bottom should be blue: {bottom:?}"
    );
    assert_eq!(
        pixels.dimensions(),
        (192, 320),
        "the portrait bucket nearest 1:2"
    );
    assert!(
        prepared
            .report
            .warnings
            .iter()
            .any(|w| w.contains("only 1 image"))
    );
}

#[test]
fn cmyk_grayscale_and_alpha_become_rgb() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("cmyk.jpg"), dir.path().join("sksper (1).jpg")).unwrap();
    image::GrayImage::from_pixel(40, 40, image::Luma([128]))
        .save(dir.path().join("sksper (2).png"))
        .unwrap();
    image::RgbaImage::from_pixel(40, 40, image::Rgba([0, 0, 255, 0]))
        .save(dir.path().join("sksper (3).png"))
        .unwrap();
    let prepared = prepare(dir.path(), &dataset(64)).unwrap();
    let centre = |i: usize| prepared.images[i].pixels.get_pixel(32, 32).0;
    let red = centre(0);
    assert!(
        red[0] > 200 && red[1] < 60 && red[2] < 60,
        "CMYK red: {red:?}"
    );
    let gray = centre(1);
    assert!(
        gray.iter().all(|c| (120..=136).contains(c)),
        "gray: {gray:?}"
    );
    assert_eq!(
        centre(2),
        [255, 255, 255],
        "transparent pixels composite over white"
    );
}

/// Whether a decoding problem is the expected one.
type ProblemCheck = fn(&ImageProblem) -> bool;

#[test]
fn bad_files_fail_naming_the_file() {
    let cases: [(&str, &[u8], ProblemCheck); 5] = [
        ("sksper (9).jpg", b"", |p| *p == ImageProblem::Empty),
        ("notes.jpg", b"this is text, not a photo", |p| {
            *p == ImageProblem::Unrecognised
        }),
        ("anim.gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", |p| {
            matches!(p, ImageProblem::UnsupportedFormat(ImageFormat::Gif))
        }),
        (
            "iphone.heic",
            b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
            |p| *p == ImageProblem::Heic,
        ),
        (
            "cut.png",
            &[
                0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13, b'I', b'H',
            ],
            |p| matches!(p, ImageProblem::Corrupt(_)),
        ),
    ];
    for (name, bytes, expected) in cases {
        let dir = good_folder();
        std::fs::write(dir.path().join(name), bytes).unwrap();
        let error = prepare(dir.path(), &dataset(64)).unwrap_err();
        match &error {
            DataError::InvalidImage { file, problem } => {
                assert!(file.ends_with(name), "{error}");
                assert!(expected(problem), "{name}: {problem:?}");
            }
            other => panic!("{name}: unexpected {other}"),
        }
        assert!(error.to_string().contains(name), "{error}");
    }
}

#[test]
fn skip_invalid_skips_and_reports_instead() {
    let dir = good_folder();
    std::fs::write(dir.path().join("broken.jpg"), b"").unwrap();
    std::fs::write(
        dir.path().join("anim.gif"),
        b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
    )
    .unwrap();
    let prepared = prepare(
        dir.path(),
        &Dataset {
            skip_invalid: true,
            ..dataset(64)
        },
    )
    .unwrap();
    assert_eq!(prepared.images.len(), 5);
    let skipped: Vec<(&str, &str)> = prepared
        .report
        .skipped
        .iter()
        .map(|s| (s.file.as_str(), s.reason.as_str()))
        .collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[0].0, "anim.gif");
    assert!(skipped[0].1.contains("Gif"));
    assert_eq!(skipped[1], ("broken.jpg", "the file is empty"));
    assert!(
        prepared
            .report
            .warnings
            .iter()
            .any(|w| w.contains("2 file(s) skipped"))
    );
}

#[test]
fn a_folder_without_images_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("readme.txt"), "captions only").unwrap();
    let error = prepare(dir.path(), &dataset(64)).unwrap_err();
    assert!(matches!(error, DataError::NoImages { .. }), "{error}");
    let missing = prepare(&dir.path().join("nope"), &dataset(64)).unwrap_err();
    assert!(matches!(missing, DataError::ReadDir { .. }) && missing.to_string().contains("nope"));
}

#[test]
fn external_captions_append_the_text_file() {
    let dir = tempfile::tempdir().unwrap();
    save(
        dir.path(),
        "sksper (1).png",
        &photo(64, 64),
        ImageFormat::Png,
    );
    std::fs::write(dir.path().join("sksper (1).txt"), "smiling,\noutdoors\n").unwrap();
    save(
        dir.path(),
        "sksper (2).png",
        &photo(70, 64),
        ImageFormat::Png,
    );
    let external = Dataset {
        captions: Captions::External,
        ..dataset(64)
    };
    let error = prepare(dir.path(), &external).unwrap_err();
    assert!(matches!(error, DataError::MissingCaption { .. }), "{error}");
    assert!(error.to_string().contains("sksper (2).txt"), "{error}");
    std::fs::write(dir.path().join("sksper (2).txt"), "in a hat").unwrap();
    let prepared = prepare(dir.path(), &external).unwrap();
    let captions: Vec<&str> = prepared.images.iter().map(|i| i.caption.as_str()).collect();
    assert_eq!(captions, ["sksper smiling, outdoors", "sksper in a hat"]);
}

#[test]
fn several_subjects_keep_their_digits_and_prompt_captions_use_the_template() {
    let dir = tempfile::tempdir().unwrap();
    save(
        dir.path(),
        "person1 (1).png",
        &photo(64, 64),
        ImageFormat::Png,
    );
    save(
        dir.path(),
        "person2 (1).png",
        &photo(64, 64),
        ImageFormat::Png,
    );
    let prepared = prepare(dir.path(), &dataset(64)).unwrap();
    let captions: Vec<&str> = prepared.images.iter().map(|i| i.caption.as_str()).collect();
    assert_eq!(captions, ["person1", "person2"]);
    let prompt = Dataset {
        captions: Captions::Prompt,
        instance_prompt: Some("photo of {token} person".into()),
        token: Some("sksper".into()),
        ..dataset(64)
    };
    let prepared = prepare(dir.path(), &prompt).unwrap();
    assert!(
        prepared
            .images
            .iter()
            .all(|i| i.caption == "photo of sksper person")
    );
}

#[test]
fn numbered_files_fall_back_to_the_token_or_fail() {
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), "123.png", &photo(64, 64), ImageFormat::Png);
    let error = prepare(dir.path(), &dataset(64)).unwrap_err();
    assert!(
        matches!(error, DataError::EmptyCaption { .. }) && error.to_string().contains("123.png"),
        "{error}"
    );
    let with_token = Dataset {
        token: Some("sksper".into()),
        ..dataset(64)
    };
    assert_eq!(
        prepare(dir.path(), &with_token).unwrap().images[0].caption,
        "sksper"
    );
}

#[test]
fn duplicates_and_small_images_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    save(
        dir.path(),
        "sksper (1).png",
        &photo(200, 200),
        ImageFormat::Png,
    );
    std::fs::copy(
        dir.path().join("sksper (1).png"),
        dir.path().join("sksper (2).png"),
    )
    .unwrap();
    save(
        dir.path(),
        "sksper (3).png",
        &photo(40, 300),
        ImageFormat::Png,
    );
    let report = prepare(dir.path(), &dataset(128)).unwrap().report;
    assert_eq!(
        report.duplicates,
        vec![vec![
            "sksper (1).png".to_owned(),
            "sksper (2).png".to_owned()
        ]]
    );
    assert_eq!(report.smaller_than_resolution, ["sksper (3).png"]);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("identical files"))
    );
}

#[test]
fn smart_crop_follows_the_subject() {
    // A detailed subject at the far right of a flat wide image.
    let image = RgbImage::from_fn(300, 100, |x, y| {
        if x >= 240 && (x / 3 + y / 3) % 2 == 0 {
            Rgb([255, 255, 255])
        } else {
            Rgb([60, 60, 60])
        }
    });
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), "sksper.png", &image, ImageFormat::Png);
    let detail = |crop| {
        let prepared = prepare(
            dir.path(),
            &Dataset {
                crop,
                ..dataset(64)
            },
        )
        .unwrap();
        prepared.images[0]
            .pixels
            .pixels()
            .filter(|p| p.0[0] > 200)
            .count()
    };
    assert_eq!(
        detail(Crop::Center),
        0,
        "the centre crop misses the subject"
    );
    assert!(detail(Crop::Smart) > 200, "the smart crop keeps it");
}
