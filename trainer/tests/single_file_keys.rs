//! The diffusers ↔ original SD name mapping on the full-size SD 1.5 and SD 2.1 key lists
//! (names and shapes made by the reference from the published configs), and on the tiny
//! single files the reference converted with its own code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dreambooth_api::spec::Precision;
use dreambooth_trainer::checkpoint::single_file::{
    Components, Layouts, Named, Shape, TextLayout, from_original, to_original,
};
use dreambooth_trainer::checkpoint::{
    LoadOptions, SdVersion, load_pipeline_weights, load_pipeline_weights_with, read_safetensors,
    save_single_file,
};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_json(name: &str) -> Value {
    let path = fixture(name);
    serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

fn shapes(map: &Value, prefix: &str) -> Named<Shape> {
    map.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                format!("{prefix}{k}"),
                Shape(serde_json::from_value(v.clone()).unwrap()),
            )
        })
        .collect()
}

struct KeyLists {
    layouts: Layouts,
    diffusers: Components<Shape>,
    single_file: Named<Shape>,
    /// What published single files hold besides the networks' weights.
    extras: Named<Shape>,
}

fn key_lists(name: &str) -> KeyLists {
    let doc = read_json(&format!("keys/{name}.json"));
    let configs = &doc["configs"];
    let layouts =
        Layouts::from_configs(&configs["unet"], &configs["vae"], &configs["text_encoder"]).unwrap();
    let mut text = shapes(&doc["text_encoder"], "text_model.");
    text.retain(|k, _| !k.ends_with("position_ids"));
    KeyLists {
        layouts,
        diffusers: Components {
            unet: shapes(&doc["unet"], ""),
            vae: shapes(&doc["vae"], ""),
            text_encoder: text,
        },
        single_file: shapes(&read_json(&format!("keys/{name}_single_file.json")), ""),
        extras: shapes(&read_json("keys/single_file_extras.json")[name], ""),
    }
}

fn clone(c: &Components<Shape>) -> Components<Shape> {
    Components {
        unet: c.unet.clone(),
        vae: c.vae.clone(),
        text_encoder: c.text_encoder.clone(),
    }
}

/// Equal maps, reporting the first few differences rather than two thousand lines.
fn assert_same_shapes(got: &Named<Shape>, want: &Named<Shape>, what: &str) {
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(5)
        .collect();
    let extra: Vec<_> = got
        .keys()
        .filter(|k| !want.contains_key(*k))
        .take(5)
        .collect();
    let wrong: Vec<_> = want
        .iter()
        .filter(|(k, s)| got.get(*k).is_some_and(|g| g != *s))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && wrong.is_empty(),
        "{what}: missing {missing:?}, extra {extra:?}, wrong shapes {wrong:?}"
    );
    assert_eq!(got.len(), want.len());
}

fn full_size_maps_both_ways(name: &str, text: TextLayout) {
    let lists = key_lists(name);
    assert_eq!(lists.layouts.text, text);
    let source = Path::new(name);

    let written = to_original(clone(&lists.diffusers), &lists.layouts, source).unwrap();
    assert_same_shapes(
        &written,
        &lists.single_file,
        &format!("{name}: diffusers → single file"),
    );

    let mut published = lists.single_file.clone();
    published.extend(lists.extras.clone());
    assert_eq!(
        Layouts::infer(&published).unwrap(),
        lists.layouts,
        "{name}: layout read off the names"
    );
    let read = from_original(published, &lists.layouts, source).unwrap();
    assert_same_shapes(&read.unet, &lists.diffusers.unet, &format!("{name}: unet"));
    assert_same_shapes(&read.vae, &lists.diffusers.vae, &format!("{name}: vae"));
    assert_same_shapes(
        &read.text_encoder,
        &lists.diffusers.text_encoder,
        &format!("{name}: text encoder"),
    );
}

#[test]
fn sd15_names_and_shapes_map_exactly_both_ways() {
    full_size_maps_both_ways("sd15", TextLayout::Clip);
}

#[test]
fn sd21_names_and_shapes_map_exactly_both_ways() {
    full_size_maps_both_ways("sd21", TextLayout::OpenClip { layers: 23 });
}

#[test]
fn sd1_text_encoder_without_text_model_is_accepted() {
    let lists = key_lists("sd15");
    let mut old: Named<Shape> = lists.single_file.clone();
    let text: Vec<String> = old
        .keys()
        .filter(|k| k.starts_with("cond_stage_model."))
        .cloned()
        .collect();
    for key in text {
        let shape = old.remove(&key).unwrap();
        old.insert(
            key.replace("transformer.text_model.", "transformer."),
            shape,
        );
    }
    let read = from_original(old, &lists.layouts, Path::new("old.ckpt")).unwrap();
    assert_same_shapes(
        &read.text_encoder,
        &lists.diffusers.text_encoder,
        "sd15 text without text_model.",
    );
}

#[test]
fn unknown_names_inside_a_network_are_errors() {
    let lists = key_lists("sd15");
    let mut odd = lists.single_file.clone();
    odd.insert(
        "model.diffusion_model.input_blocks.1.0.in_layers.9.weight".into(),
        Shape(vec![1]),
    );
    let message = from_original(odd, &lists.layouts, Path::new("odd.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("odd.safetensors")
            && message.contains("input_blocks.1.0.in_layers.9.weight"),
        "{message}"
    );

    let mut extra = clone(&lists.diffusers);
    extra.unet.insert(
        "down_blocks.9.resnets.0.conv1.weight".into(),
        Shape(vec![1]),
    );
    let message = to_original(extra, &lists.layouts, Path::new("folder"))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("down_blocks.9.resnets.0.conv1.weight"),
        "{message}"
    );
}

/// The reference's tiny single files (OpenCLIP extras and all) load to exactly the folder's
/// tensors, and what we write equals what the reference wrote, less those extras.
fn tiny_single_file(name: &str, version: SdVersion) {
    let folder = load_pipeline_weights(&fixture(name)).unwrap();
    let path = fixture(&format!("{name}.safetensors"));
    for options in [
        LoadOptions::default(),
        LoadOptions {
            configs_from: Some(fixture(name)),
            ..Default::default()
        },
    ] {
        let single = load_pipeline_weights_with(&path, &options).unwrap();
        assert_eq!(single.version, version);
        for (got, want, what) in [
            (&single.unet.tensors, &folder.unet.tensors, "unet"),
            (&single.vae.tensors, &folder.vae.tensors, "vae"),
            (
                &single.text_encoder.tensors,
                &folder.text_encoder.tensors,
                "text encoder",
            ),
        ] {
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "{name} {what}"
            );
            assert!(
                got.iter().all(|(k, t)| t.equal(&want[k])),
                "{name} {what} values"
            );
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.safetensors");
    save_single_file(&folder, &ours, Precision::Fp32).unwrap();
    let ours = read_safetensors(&ours).unwrap();
    let reference: BTreeMap<_, _> = read_safetensors(&path).unwrap();
    let extras: Vec<&String> = reference
        .keys()
        .filter(|k| !ours.contains_key(*k))
        .collect();
    assert!(
        extras.iter().all(|k| k.ends_with("position_ids")
            || k.contains("text_projection")
            || k.contains("logit_scale")
            || k.contains(".resblocks.")),
        "{name}: {extras:?}"
    );
    assert!(
        ours.iter()
            .all(|(k, t)| reference.get(k).is_some_and(|r| r.equal(t))),
        "{name}: written tensors differ"
    );
}

#[test]
fn tiny_sd1_single_file_matches_the_reference() {
    tiny_single_file("tiny-sd1", SdVersion::Sd1);
}

#[test]
fn tiny_sd2_single_file_matches_the_reference() {
    tiny_single_file("tiny-sd2", SdVersion::Sd2);
}
