//! The tokenizer gives exactly the ids of transformers' `CLIPTokenizer` (padding to 77,
//! truncation) on the real 49408-token CLIP vocabulary and on the tiny models' own
//! tokenizers: rare words, punctuation, contractions, unicode, emoji, a 126-word prompt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dreambooth_trainer::tokenizer::ClipTokenizer;
use serde::Deserialize;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[derive(Deserialize)]
struct Case {
    vocab: String,
    prompt: String,
    input_ids: Vec<i64>,
    pad_token_id: i64,
    eos_token_id: i64,
}

fn tokenizer(vocab: &str) -> ClipTokenizer {
    let root = fixtures();
    match vocab {
        "clip-vocab" => {
            let dir = root.join("clip-vocab");
            ClipTokenizer::from_files(dir.join("vocab.json"), dir.join("merges.txt")).unwrap()
        }
        model => ClipTokenizer::from_dir(root.join(model).join("tokenizer")).unwrap(),
    }
}

#[test]
fn ids_match_transformers_clip_tokenizer() {
    let path = fixtures().join("tokenizer_parity.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    let mut tokenizers: HashMap<String, ClipTokenizer> = HashMap::new();
    let mut mismatches = Vec::new();
    for case in &cases {
        let tok = tokenizers
            .entry(case.vocab.clone())
            .or_insert_with(|| tokenizer(&case.vocab));
        assert_eq!(tok.pad_id(), case.pad_token_id, "{}: pad token", case.vocab);
        assert_eq!(tok.eos_id(), case.eos_token_id, "{}: end token", case.vocab);
        let ids = tok.encode(&case.prompt).unwrap();
        if ids != case.input_ids {
            mismatches.push(format!(
                "{} {:?}:\n  ours   {:?}\n  theirs {:?}",
                case.vocab, case.prompt, ids, case.input_ids
            ));
        }
    }
    eprintln!(
        "tokenizer parity: {} prompts, {} mismatches",
        cases.len(),
        mismatches.len()
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert!(
        tokenizers.len() >= 3 && cases.len() >= 20,
        "the fixture covers too little"
    );
    let real = &tokenizers["clip-vocab"];
    assert_eq!(real.vocab_size(), 49408);
}

#[test]
fn sd2_pads_with_its_own_pad_token() {
    let sd1 = tokenizer("tiny-sd1");
    let sd2 = tokenizer("tiny-sd2");
    assert_eq!(sd1.pad_id(), sd1.eos_id());
    assert_ne!(sd2.pad_id(), sd2.eos_id());
    let ids = sd2.encode("photo of sksper person").unwrap();
    let end = ids.iter().position(|&i| i == sd2.eos_id()).unwrap();
    assert!(ids[end + 1..].iter().all(|&i| i == sd2.pad_id()));
}

#[test]
fn the_bundled_vocabulary_tokenizes_like_transformers() {
    let path = fixtures().join("tokenizer_parity.json");
    let cases: Vec<Case> = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let sd1 = ClipTokenizer::from_dir(
        dreambooth_trainer::tokenizer::bundled_tokenizer_dir(false).unwrap(),
    )
    .unwrap();
    let sd2 = ClipTokenizer::from_dir(
        dreambooth_trainer::tokenizer::bundled_tokenizer_dir(true).unwrap(),
    )
    .unwrap();
    let real: Vec<&Case> = cases.iter().filter(|c| c.vocab == "clip-vocab").collect();
    assert!(real.len() >= 10);
    for case in real {
        assert_eq!(
            sd1.encode(&case.prompt).unwrap(),
            case.input_ids,
            "{:?}",
            case.prompt
        );
    }
    assert_eq!(sd1.vocab_size(), 49408);
    assert_eq!(sd2.pad_id(), 0, "SD 2.x pads with `!`");
}
