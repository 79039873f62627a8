//! Captions: from the file name (`sksper (1).jpg` → `sksper`), from the file name plus
//! `<stem>.txt` (as the fast-DreamBooth notebook does), or from a prompt template.

/// The file stem with its counter removed and `_` read as a space.
///
/// Only a trailing counter goes: `sksper (1)`, `sksper 1`, `sksper-(12)`, `sksper_3` →
/// `sksper`. Digits inside a word stay, so `person1 (3)` → `person1` and several subjects
/// can share one session (the notebook strips every digit, merging them).
pub fn caption_from_stem(stem: &str) -> String {
    let mut rest = stem.trim_end();
    // `(12)` with or without a separator before it.
    if let Some(inner) = rest.strip_suffix(')') {
        if let Some(open) = inner.rfind('(') {
            let digits = &inner[open + 1..];
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                rest = &inner[..open];
            }
        }
    } else {
        // A bare number counts only after a separator: `sksper 1`, not `person1`.
        let without_digits = rest.trim_end_matches(|c: char| c.is_ascii_digit());
        if without_digits.len() < rest.len()
            && (without_digits.is_empty() || without_digits.ends_with([' ', '-', '_']))
        {
            rest = without_digits;
        }
    }
    let rest = rest.trim_end_matches([' ', '-', '_']);
    rest.split(['_', ' '])
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `external` captions: the file-name caption, a space, then the text file's contents
/// (whitespace and line breaks folded to single spaces).
pub fn external_caption(stem_caption: &str, text: &str) -> String {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match (stem_caption.is_empty(), text.is_empty()) {
        (true, _) => text,
        (false, true) => stem_caption.to_owned(),
        (false, false) => format!("{stem_caption} {text}"),
    }
}

/// `prompt` captions: the template with every `{token}` replaced.
pub fn prompt_caption(template: &str, token: &str) -> String {
    template.replace("{token}", token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_removed_from_file_names() {
        for (stem, caption) in [
            ("sksper (1)", "sksper"),
            ("sksper 1", "sksper"),
            ("sksper-(12)", "sksper"),
            ("sksper(3)", "sksper"),
            ("sksper_7", "sksper"),
            ("sksper", "sksper"),
            ("a_photo_of_sksper (2)", "a photo of sksper"),
            ("sksper  person   (10)", "sksper person"),
        ] {
            assert_eq!(caption_from_stem(stem), caption, "{stem}");
        }
    }

    #[test]
    fn digits_inside_words_are_kept() {
        assert_eq!(caption_from_stem("person1 (3)"), "person1");
        assert_eq!(caption_from_stem("person2 (3)"), "person2");
        assert_eq!(caption_from_stem("person1"), "person1");
        assert_eq!(caption_from_stem("r2d2 robot"), "r2d2 robot");
        assert_eq!(caption_from_stem("zwx2024(1)"), "zwx2024");
    }

    #[test]
    fn a_stem_that_is_only_a_counter_leaves_nothing() {
        assert_eq!(caption_from_stem("123"), "");
        assert_eq!(caption_from_stem("(4)"), "");
    }

    #[test]
    fn external_captions_follow_the_file_name_token() {
        assert_eq!(
            external_caption("sksper", "  smiling,\n outdoors \n"),
            "sksper smiling, outdoors"
        );
        assert_eq!(external_caption("sksper", ""), "sksper");
        assert_eq!(external_caption("", "a red car"), "a red car");
    }

    #[test]
    fn prompt_captions_fill_the_token() {
        assert_eq!(
            prompt_caption("photo of {token} person", "sksper"),
            "photo of sksper person"
        );
        assert_eq!(
            prompt_caption("{token}, {token} style", "xyz"),
            "xyz, xyz style"
        );
    }
}
