//! What any caller may hand a pipeline, whatever the model: seeds every client can carry
//! exactly, and prompts that every image format's metadata can hold.

/// The largest seed: 2^53 − 1, the largest integer a JSON number carries exactly (the
/// Node SDK, browsers and any client that parses JSON into doubles would round a larger
/// one, and could not reproduce its image). Image `i` of a request uses `seed + i`, so
/// `seed + n − 1` must not pass it either.
pub const MAX_SEED: u64 = (1 << 53) - 1;

/// Why `prompt` cannot be taken, if it cannot: it holds a control character other than
/// newline, carriage return or tab (PNG text chunks may not hold NUL, and no prompt needs
/// them). The message names the character and its position.
pub fn prompt_problem(prompt: &str) -> Option<String> {
    let (at, c) = prompt
        .chars()
        .enumerate()
        .find(|(_, c)| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))?;
    Some(format!(
        "the control character U+{:04X} at position {at}; only newline, carriage return and tab are allowed",
        c as u32
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_but_whitespace_are_named_with_their_position() {
        assert_eq!(prompt_problem("a cat\non a mat\r\n\twith a hat"), None);
        assert_eq!(prompt_problem("ünïcödé 猫 🐈"), None);
        let said = prompt_problem("a\u{0}b").unwrap();
        assert!(
            said.contains("U+0000") && said.contains("position 1"),
            "{said}"
        );
        assert!(prompt_problem("bell\u{7}").unwrap().contains("U+0007"));
        assert!(prompt_problem("c1 \u{85}").unwrap().contains("U+0085"));
    }

    #[test]
    fn the_largest_seed_is_exact_in_a_double() {
        assert_eq!(MAX_SEED as f64 as u64, MAX_SEED);
        assert_ne!((MAX_SEED + 2) as f64 as u64, MAX_SEED + 2);
    }
}
