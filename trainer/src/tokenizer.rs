//! The CLIP tokenizer, on the model's own `vocab.json` and `merges.txt`.
//!
//! Built from the `tokenizers` crate with the same pipeline as transformers'
//! `CLIPTokenizer`: NFC, whitespace collapsed, lower-cased; split on CLIP's pattern (letters,
//! single digits, punctuation runs, English contractions); byte-level mapping; BPE whose
//! word-final pieces carry `</w>`. Every prompt becomes exactly `max_length` (77) ids:
//! start token, at most 75 text tokens, end token, then the pad token (`<|endoftext|>` for
//! SD 1.x, `!` for SD 2.x, from the tokenizer's own config).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::replace::{Replace, ReplacePattern};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::utils::{Lowercase, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// CLIP's word pattern; text between matches (whitespace) is dropped.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The context length every Stable Diffusion text encoder was trained with.
pub const CLIP_MAX_LENGTH: usize = 77;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid tokenizer file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("tokenizer vocabulary {path} has no token {token:?} (needed as the {role} token)")]
    MissingToken {
        path: PathBuf,
        token: String,
        role: &'static str,
    },
    #[error("cannot tokenize {text:?}: {message}")]
    Encode { text: String, message: String },
}

/// The special tokens and length a tokenizer folder configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: String,
    pub eos: String,
    pub pad: String,
    pub unk: String,
    pub max_length: usize,
}

impl Default for SpecialTokens {
    fn default() -> Self {
        Self {
            bos: "<|startoftext|>".into(),
            eos: "<|endoftext|>".into(),
            pad: "<|endoftext|>".into(),
            unk: "<|endoftext|>".into(),
            max_length: CLIP_MAX_LENGTH,
        }
    }
}

impl SpecialTokens {
    /// Reads `tokenizer_config.json`, then `special_tokens_map.json` for what it leaves out.
    /// Token values may be plain strings or transformers' `{"content": ...}` objects.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let mut tokens = Self::default();
        let mut seen = HashMap::new();
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            let json = read_json(&path)?;
            for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
                if let Some(value) = json.get(key).and_then(token_content) {
                    seen.insert(key, value);
                }
            }
            if let Some(n) = json.get("model_max_length").and_then(|v| v.as_f64()) {
                // transformers writes a huge sentinel when there is no limit.
                if (1.0..=1e6).contains(&n) {
                    tokens.max_length = n as usize;
                }
            }
        }
        for (key, value) in seen {
            match key {
                "bos_token" => tokens.bos = value,
                "eos_token" => tokens.eos = value,
                "pad_token" => tokens.pad = value,
                _ => tokens.unk = value,
            }
        }
        Ok(tokens)
    }
}

fn token_content(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(map) => map.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn read_text(path: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value, TokenizerError> {
    serde_json::from_str(&read_text(path)?).map_err(|e| TokenizerError::Invalid {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// A CLIP BPE tokenizer producing fixed-length id sequences for the text encoder.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: i64,
    eos_id: i64,
    pad_id: i64,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl ClipTokenizer {
    /// A tokenizer folder (`vocab.json`, `merges.txt`, and the optional configs naming the
    /// special tokens), as found in a diffusers model's `tokenizer/`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let dir = dir.as_ref();
        let special = SpecialTokens::from_dir(dir)?;
        Self::with_special_tokens(dir.join("vocab.json"), dir.join("merges.txt"), special)
    }

    /// The vocabulary and merges alone, with CLIP's default special tokens.
    pub fn from_files(
        vocab: impl AsRef<Path>,
        merges: impl AsRef<Path>,
    ) -> Result<Self, TokenizerError> {
        Self::with_special_tokens(vocab, merges, SpecialTokens::default())
    }

    pub fn with_special_tokens(
        vocab_path: impl AsRef<Path>,
        merges_path: impl AsRef<Path>,
        special: SpecialTokens,
    ) -> Result<Self, TokenizerError> {
        let (vocab_path, merges_path) = (vocab_path.as_ref(), merges_path.as_ref());
        let vocab = read_vocab(vocab_path)?;
        let merges = read_merges(merges_path)?;
        let id = |token: &str, role: &'static str| {
            vocab
                .get(token)
                .map(|&i| i as i64)
                .ok_or_else(|| TokenizerError::MissingToken {
                    path: vocab_path.to_owned(),
                    token: token.to_owned(),
                    role,
                })
        };
        let (bos_id, eos_id, pad_id) = (
            id(&special.bos, "start")?,
            id(&special.eos, "end")?,
            id(&special.pad, "pad")?,
        );
        id(&special.unk, "unknown")?;

        let invalid = |path: &Path, e: &dyn std::fmt::Display| TokenizerError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(special.unk.clone())
            .fuse_unk(false)
            .build()
            .map_err(|e| invalid(merges_path, &e))?;
        let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(|e| invalid(vocab_path, &e))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| invalid(vocab_path, &e))?;

        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])));
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        // transformers registers the special tokens, so their literal text in a prompt maps
        // straight to their ids.
        let mut specials: Vec<AddedToken> = Vec::new();
        for token in [&special.bos, &special.eos, &special.unk, &special.pad] {
            if !specials.iter().any(|t| &t.content == token) {
                specials.push(AddedToken::from(token.clone(), true));
            }
        }
        tokenizer.add_special_tokens(&specials);
        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            pad_id,
            max_length: special.max_length,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    pub fn bos_id(&self) -> i64 {
        self.bos_id
    }

    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }

    /// The text's BPE ids with no start/end tokens and no length limit.
    pub fn tokenize(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode {
                text: text.to_owned(),
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Exactly `max_length` ids: start, the text (truncated to fit), end, padding.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let body = self.tokenize(text)?;
        let room = self.max_length.saturating_sub(2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&body[..body.len().min(room)]);
        ids.push(self.eos_id);
        ids.resize(self.max_length.max(ids.len()), self.pad_id);
        Ok(ids)
    }

    pub fn encode_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
    ) -> Result<Vec<Vec<i64>>, TokenizerError> {
        texts.iter().map(|t| self.encode(t.as_ref())).collect()
    }

    /// A batch as the `[batch, max_length]` int64 tensor the text encoder takes.
    pub fn encode_tensor<S: AsRef<str>>(&self, texts: &[S]) -> Result<tch::Tensor, TokenizerError> {
        let ids: Vec<i64> = self.encode_batch(texts)?.concat();
        Ok(tch::Tensor::from_slice(&ids).view([texts.len() as i64, self.max_length as i64]))
    }
}

fn read_vocab(path: &Path) -> Result<Vocab, TokenizerError> {
    let map: HashMap<String, u32> =
        serde_json::from_str(&read_text(path)?).map_err(|e| TokenizerError::Invalid {
            path: path.to_owned(),
            message: format!("expected a JSON object of token → id: {e}"),
        })?;
    Ok(map.into_iter().collect())
}

/// `merges.txt`: an optional `#version` line, then one space-separated pair per line.
fn read_merges(path: &Path) -> Result<Merges, TokenizerError> {
    let text = read_text(path)?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        match line.split_once(' ') {
            Some((a, b)) if !b.contains(' ') => merges.push((a.to_owned(), b.to_owned())),
            _ => {
                return Err(TokenizerError::Invalid {
                    path: path.to_owned(),
                    message: format!("line {} is not a pair of tokens: {line:?}", n + 1),
                });
            }
        }
    }
    Ok(merges)
}

/// CLIP's BPE vocabulary (49408 tokens), the same for SD 1.x and 2.x, embedded so that a
/// single-file model (which carries no tokenizer) can still be trained and sampled. The
/// fixture script writes these files from open-clip's `bpe_simple_vocab_16e6.txt.gz`.
const BUNDLED_VOCAB: &str = include_str!("../tests/fixtures/clip-vocab/vocab.json");
const BUNDLED_MERGES: &str = include_str!("../tests/fixtures/clip-vocab/merges.txt");

/// A tokenizer folder holding the bundled vocabulary, written once under the temp dir.
/// SD 2.x pads with `!` where SD 1.x pads with the end-of-text token.
pub fn bundled_tokenizer_dir(pad_with_exclamation: bool) -> std::io::Result<std::path::PathBuf> {
    let name = if pad_with_exclamation { "sd2" } else { "sd1" };
    let dir = std::env::temp_dir().join(format!(
        "dreambooth-clip-tokenizer-{name}-{}",
        BUNDLED_VOCAB.len()
    ));
    let pad = if pad_with_exclamation {
        "!"
    } else {
        "<|endoftext|>"
    };
    let config = serde_json::json!({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
    });
    if !dir.join("tokenizer_config.json").exists() {
        // Written to a private folder and renamed, so concurrent runs never see half a file.
        let staging = std::env::temp_dir().join(format!(".{name}-{}", std::process::id()));
        std::fs::create_dir_all(&staging)?;
        std::fs::write(staging.join("vocab.json"), BUNDLED_VOCAB)?;
        std::fs::write(staging.join("merges.txt"), BUNDLED_MERGES)?;
        std::fs::write(staging.join("tokenizer_config.json"), config.to_string())?;
        if std::fs::rename(&staging, &dir).is_err() {
            // Another process got there first.
            let _ = std::fs::remove_dir_all(&staging);
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary covering the byte-level alphabet and a few merges, like CLIP's own.
    fn toy(dir: &Path, pad: Option<&str>) -> ClipTokenizer {
        let mut vocab: Vec<String> = Vec::new();
        // The printable byte-level characters, alone and word-final.
        let alphabet: Vec<char> = ('!'..='~')
            .chain('¡'..='¬')
            .chain('®'..='ÿ')
            .chain('Ā'..='Ń')
            .collect();
        for c in &alphabet {
            vocab.push(c.to_string());
        }
        for c in &alphabet {
            vocab.push(format!("{c}</w>"));
        }
        let merges = ["h e", "he l", "hel l", "hell o</w>", "c a", "ca t</w>"];
        vocab.extend(["he", "hel", "hell", "hello</w>", "ca", "cat</w>"].map(String::from));
        vocab.extend(["<|startoftext|>", "<|endoftext|>"].map(String::from));
        let json: serde_json::Map<String, serde_json::Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i.into()))
            .collect();
        std::fs::write(
            dir.join("vocab.json"),
            serde_json::Value::Object(json).to_string(),
        )
        .unwrap();
        std::fs::write(
            dir.join("merges.txt"),
            format!("#version: 0.2\n{}\n", merges.join("\n")),
        )
        .unwrap();
        if let Some(pad) = pad {
            let config = serde_json::json!({"pad_token": {"content": pad, "__type": "AddedToken"}, "model_max_length": 8});
            std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        }
        ClipTokenizer::from_dir(dir).unwrap()
    }

    #[test]
    fn words_merge_and_end_with_the_end_of_word_marker() {
        let dir = tempfile::tempdir().unwrap();
        let tok = toy(dir.path(), None);
        let id = |t: &str| tok.tokenizer.token_to_id(t).unwrap() as i64;
        assert_eq!(
            tok.tokenize("  Hello   CAT!").unwrap(),
            [id("hello</w>"), id("cat</w>"), id("!</w>")]
        );
        // Single digits are words of their own; "cats" has no merge for "t s</w>".
        assert_eq!(tok.tokenize("42").unwrap(), [id("4</w>"), id("2</w>")]);
        assert_eq!(
            tok.tokenize("cats").unwrap(),
            [id("ca"), id("t"), id("s</w>")]
        );
        assert_eq!(
            tok.tokenize("it's").unwrap(),
            [id("i"), id("t</w>"), id("'"), id("s</w>")]
        );
    }

    #[test]
    fn encode_pads_to_the_configured_length_with_the_configured_pad() {
        let dir = tempfile::tempdir().unwrap();
        let tok = toy(dir.path(), Some("!"));
        assert_eq!(tok.max_length(), 8);
        let ids = tok.encode("hello").unwrap();
        let bang = tok.tokenizer.token_to_id("!").unwrap() as i64;
        assert_eq!(ids.len(), 8);
        assert_eq!(ids[0], tok.bos_id());
        assert_eq!(ids[2], tok.eos_id());
        assert!(ids[3..].iter().all(|&i| i == bang));
    }

    #[test]
    fn long_prompts_are_truncated_keeping_the_end_token_last() {
        let dir = tempfile::tempdir().unwrap();
        let tok = toy(dir.path(), Some("<|endoftext|>"));
        let ids = tok.encode("a b c d e f g h i j").unwrap();
        let a = tok.tokenizer.token_to_id("a</w>").unwrap() as i64;
        assert_eq!(ids.len(), 8);
        assert_eq!(ids[1], a);
        assert_eq!(*ids.last().unwrap(), tok.eos_id());
        let batch = tok.encode_tensor(&["hello", "cat"]).unwrap();
        assert_eq!(batch.size(), [2, 8]);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("vocab.json"), "{err}");
        std::fs::write(dir.path().join("vocab.json"), r#"{"a": 0}"#).unwrap();
        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\n").unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("vocab.json") && err.contains("<|startoftext|>"),
            "{err}"
        );
        std::fs::write(dir.path().join("merges.txt"), "a b c\n").unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("merges.txt") && err.contains("line 1"),
            "{err}"
        );
    }
}
