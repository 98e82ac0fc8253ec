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

/// The first of `steps` steps an edit at `strength` runs from, as diffusers' `get_timesteps`
/// (`steps − min(steps · strength, steps)`, truncated), except that an edit below strength 1
/// always skips the first step: that step starts from pure noise, so starting there would
/// ignore the image (diffusers does, for example at 0.75 of 2 steps). So strength 1 needs
/// one step and any lower strength two.
pub fn edit_start(steps: usize, strength: f64) -> Result<usize, crate::Invalid> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(crate::Invalid::new(
            "strength",
            format!("Invalid 'strength': {strength}; it must be greater than 0 and at most 1."),
        ));
    }
    let truncated = (steps as f64 - (steps as f64 * strength).min(steps as f64)).max(0.0) as usize;
    let start = if strength < 1.0 {
        truncated.max(1)
    } else {
        truncated
    };
    if start >= steps {
        let least = if strength < 1.0 { 2 } else { 1 };
        return Err(crate::Invalid::new(
            "steps",
            format!(
                "Invalid 'steps': {steps}; an edit at strength {strength} needs at least {least} (its first step starts from noise alone), or send strength 1."
            ),
        ));
    }
    Ok(start)
}

/// A model name with case, the owner (`owner/`), dots, underscores and spaces not counting:
/// `black-forest-labs/FLUX.1-schnell`, `FLUX.1 schnell` and `flux-1-schnell` are one name.
pub fn loose_model_name(name: &str) -> String {
    let name = name.rsplit('/').next().unwrap_or(name);
    name.chars()
        .map(|c| match c {
            '.' | '_' | ' ' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edit_below_full_strength_never_starts_from_noise_alone() {
        // As diffusers: 4 − 2.4 and 4 − 2.8 truncate to 1, 4 − 0.4 to 3, strength 1 to 0.
        assert_eq!(edit_start(4, 0.6).unwrap(), 1);
        assert_eq!(edit_start(4, 0.7).unwrap(), 1);
        assert_eq!(edit_start(4, 0.1).unwrap(), 3);
        assert_eq!(edit_start(4, 1.0).unwrap(), 0);
        assert_eq!(edit_start(1, 1.0).unwrap(), 0);
        // Unlike diffusers, 0.75 of 2 and 0.9 of 4 keep the image.
        assert_eq!(edit_start(2, 0.75).unwrap(), 1);
        assert_eq!(edit_start(4, 0.9).unwrap(), 1);
        for (steps, strength, param) in [
            (4, 0.0, "strength"),
            (4, 1.5, "strength"),
            (4, f64::NAN, "strength"),
            (0, 0.5, "steps"),
            (1, 0.5, "steps"),
            (0, 1.0, "steps"),
        ] {
            assert_eq!(edit_start(steps, strength).unwrap_err().param, param);
        }
    }

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
