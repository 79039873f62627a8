//! The user guide matches the code: every field in `docs/` exists in the CRD schema and every
//! CRD field is documented (rows of a table starting with a backticked `spec.` path), the
//! `steps: auto` tables are the ones `presets.rs` computes, the fast-DreamBooth names users
//! search for are there, and relative links resolve.

#[allow(dead_code)]
mod chart_support;

use std::collections::BTreeSet;
use std::path::PathBuf;

use dreambooth_api::crd::DreamBoothSession;
use dreambooth_api::presets::{auto_text_encoder_steps, auto_unet_steps};
use dreambooth_api::spec::Preset;
use kube::CustomResourceExt;
use serde_json::Value;

fn docs() -> Vec<(PathBuf, String)> {
    let dir = chart_support::repo_root().join("docs");
    let mut pages: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| {
            let text = chart_support::read(&p);
            (p, text)
        })
        .collect();
    pages.sort();
    pages
}

fn page(name: &str) -> String {
    chart_support::read(&chart_support::repo_root().join("docs").join(name))
}

/// The convention: a table row whose first cell is a backticked `spec.` path documents it.
fn documented_fields() -> BTreeSet<String> {
    let mut fields = BTreeSet::new();
    for (_, text) in docs() {
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("| `spec.") else {
                continue;
            };
            let path = rest.split('`').next().unwrap();
            fields.insert(format!("spec.{path}"));
        }
    }
    fields
}

/// Every field path of the CRD's spec, objects and their children alike.
fn crd_fields() -> BTreeSet<String> {
    fn walk(schema: &Value, path: &str, out: &mut BTreeSet<String>) {
        let object = if schema["items"].is_object() {
            &schema["items"]
        } else {
            schema
        };
        for (name, child) in object["properties"].as_object().into_iter().flatten() {
            let child_path = format!("{path}.{name}");
            walk(child, &child_path, out);
            out.insert(child_path);
        }
    }
    let crd = serde_json::to_value(DreamBoothSession::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut fields = BTreeSet::new();
    walk(spec, "spec", &mut fields);
    fields
}

#[test]
fn every_crd_field_is_documented_and_every_documented_field_exists() {
    let documented = documented_fields();
    let crd = crd_fields();
    assert!(crd.len() > 50, "the CRD walk found too little: {crd:?}");
    let undocumented: Vec<&String> = crd.difference(&documented).collect();
    let unknown: Vec<&String> = documented.difference(&crd).collect();
    assert!(
        undocumented.is_empty(),
        "CRD fields without a row in docs/ (add them to docs/fields.md): {undocumented:#?}"
    );
    assert!(
        unknown.is_empty(),
        "docs/ documents fields the CRD does not have: {unknown:#?}"
    );
}

/// Data rows of the first Markdown table after `heading`, as cells.
fn table_after(text: &str, heading: &str) -> Vec<Vec<String>> {
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("no `{heading}`"));
    text[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

fn leading_number(cell: &str) -> usize {
    let digits: String = cell.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("`{cell}` does not start with a number"))
}

const PRESETS: [Preset; 3] = [Preset::Face, Preset::Style, Preset::Object];

#[test]
fn the_steps_auto_tables_are_what_the_presets_compute() {
    let presets = page("presets.md");
    let unet_rows = table_after(&presets, "## The `steps: auto` table");
    assert_eq!(unet_rows.len(), 4);
    for row in &unet_rows {
        let images = leading_number(&row[0]);
        for (column, preset) in PRESETS.into_iter().enumerate() {
            let documented: u32 = row[column + 1].parse().unwrap();
            assert_eq!(
                Some(documented),
                auto_unet_steps(preset, images),
                "presets.md: {preset:?} UNet steps for {images} photos"
            );
        }
    }
    let text_encoder_rows = table_after(&presets, "The text encoder then gets");
    assert_eq!(text_encoder_rows.len(), 4);
    for row in &text_encoder_rows {
        let images = leading_number(&row[0]);
        for (column, preset) in PRESETS.into_iter().enumerate() {
            let unet = auto_unet_steps(preset, images).unwrap();
            let documented: u32 = row[column + 1].parse().unwrap();
            assert_eq!(
                Some(documented),
                auto_text_encoder_steps(preset, unet),
                "presets.md: {preset:?} text-encoder steps for {images} photos"
            );
        }
    }
}

#[test]
fn the_fast_dreambooth_names_users_know_are_mapped() {
    let all: String = docs().into_iter().map(|(_, t)| t).collect();
    for name in [
        "Session_Name",
        "Training_Type",
        "Model_Version",
        "UNet_Training_Steps",
        "UNet_Learning_Rate",
        "Text_Encoder_Training_Steps",
        "Text_Encoder_Learning_Rate",
        "Offset_Noise",
        "External_Captions",
        "Resolution",
        "Save_Checkpoint_Every",
        "Start_saving_from_the_step",
        "Resume_Training",
        "Path_to_HuggingFace",
        "MODEL_PATH",
        "MODEL_LINK",
    ] {
        assert!(
            all.contains(&format!("`{name}`")),
            "docs/ never names `{name}`"
        );
    }
}

#[test]
fn troubleshooting_covers_the_problems_users_hit() {
    let page = page("troubleshooting.md");
    for heading in [
        "## Out of memory",
        "## Training is slow",
        "## The model ignores the prompt",
        "## Strange colours",
        "## The Job keeps restarting",
        "## The model will not load in AUTOMATIC1111 or ComfyUI",
    ] {
        assert!(
            page.contains(heading),
            "troubleshooting.md lacks `{heading}`"
        );
    }
}

#[test]
fn relative_links_in_the_docs_resolve() {
    for (path, text) in docs() {
        let dir = path.parent().unwrap();
        for (i, _) in text.match_indices("](") {
            let target = text[i + 2..].split(')').next().unwrap();
            if target.starts_with("http") || target.starts_with('#') {
                continue;
            }
            let file = target.split('#').next().unwrap();
            assert!(
                dir.join(file).exists(),
                "{}: broken link `{target}`",
                path.display()
            );
        }
    }
}
