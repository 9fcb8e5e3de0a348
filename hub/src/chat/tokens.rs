//! Token counts of messages: OpenAI's BPE encodings (`o200k_base` for GPT-4o, GPT-4.1, GPT-5
//! and the o-series; `cl100k_base` for GPT-4 and GPT-3.5) through `tiktoken-rs`, each loaded
//! once on first use; for every other model an estimate (a token per 4 bytes of ASCII text,
//! a token per other character, the density of CJK text in common BPEs). Counts are made once
//! per message when it is stored and kept with it, so context statistics are O(1).

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

/// How a model's text is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `o200k_base`.
    O200k,
    /// `cl100k_base`.
    Cl100k,
    /// No known tokenizer: [`estimate`].
    Estimate,
}

/// Tokens a message costs beyond its text (role and separators), as OpenAI counts chat
/// messages.
pub const MESSAGE_OVERHEAD: u64 = 4;

/// The encoding of a model name (the part after a `provider/` prefix; case-insensitive).
pub fn encoding_for(model: &str) -> Encoding {
    let m = model
        .rsplit('/')
        .next()
        .unwrap_or(model)
        .to_ascii_lowercase();
    let o200k = [
        "gpt-4o",
        "gpt-4.1",
        "gpt-4.5",
        "gpt-5",
        "o1",
        "o3",
        "o4",
        "chatgpt-4o",
    ];
    if o200k.iter().any(|p| m.starts_with(p)) {
        Encoding::O200k
    } else if m.starts_with("gpt-4")
        || m.starts_with("gpt-3.5")
        || m.starts_with("text-embedding-3")
    {
        Encoding::Cl100k
    } else {
        Encoding::Estimate
    }
}

fn bpe(enc: Encoding) -> Option<&'static CoreBPE> {
    static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();
    static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();
    match enc {
        Encoding::O200k => O200K
            .get_or_init(|| tiktoken_rs::o200k_base().ok())
            .as_ref(),
        Encoding::Cl100k => CL100K
            .get_or_init(|| tiktoken_rs::cl100k_base().ok())
            .as_ref(),
        Encoding::Estimate => None,
    }
}

/// The tokens of `text` in `enc` (the estimate when the encoding could not be loaded).
pub fn count(enc: Encoding, text: &str) -> u64 {
    match bpe(enc) {
        Some(b) => b.encode_ordinary(text).len() as u64,
        None => estimate(text),
    }
}

/// The estimate for models without a known tokenizer: ASCII bytes / 4 (rounded up) plus one
/// token per non-ASCII character.
pub fn estimate(text: &str) -> u64 {
    let mut ascii = 0u64;
    let mut other = 0u64;
    for c in text.chars() {
        if c.is_ascii() {
            ascii += 1;
        } else {
            other += 1;
        }
    }
    ascii.div_ceil(4) + other
}

/// The tokens a chat message of `text` costs in a prompt: its text plus [`MESSAGE_OVERHEAD`].
pub fn message_tokens(model: &str, text: &str) -> u64 {
    count(encoding_for(model), text) + MESSAGE_OVERHEAD
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn openai_families_use_their_bpe() {
        assert_eq!(encoding_for("gpt-4o-mini"), Encoding::O200k);
        assert_eq!(encoding_for("openai/gpt-4.1"), Encoding::O200k);
        assert_eq!(encoding_for("gpt-4-turbo"), Encoding::Cl100k);
        assert_eq!(encoding_for("gpt-3.5-turbo"), Encoding::Cl100k);
        assert_eq!(encoding_for("llama3.2:1b"), Encoding::Estimate);
        assert_eq!(count(Encoding::O200k, "hello world"), 2);
        assert_eq!(count(Encoding::Cl100k, "hello world"), 2);
        assert_eq!(count(Encoding::O200k, ""), 0);
    }

    #[test]
    fn the_estimate_counts_cjk_per_character() {
        assert_eq!(estimate("abcd"), 1);
        assert_eq!(estimate("abcde"), 2);
        assert_eq!(estimate("春天来了"), 4);
        assert_eq!(estimate(""), 0);
    }
}
