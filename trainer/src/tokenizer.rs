//! The CLIP tokenizer, on the model's own `vocab.json` and `merges.txt`.
