//! Job command templates: words with `{placeholder}`s, filled in when a job runs.
//!
//! `{name}` is a placeholder; `{{` and `}}` write a literal `{` and `}` (the rule of Rust's
//! `format!` and Python's `str.format`), so a JSON argument such as `{"lr": {learning_rate}}` is
//! written `{{"lr": {learning_rate}}}`. A lone `{` or `}` is an error, so a brace is never
//! silently dropped or taken for a placeholder.

/// One piece of a template word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text copied as is (escapes already resolved).
    Literal(String),
    /// A `{name}` to be replaced by the value of `name`.
    Placeholder(String),
}

/// Splits one word of a template into literal text and placeholders, or says what is wrong with
/// it (an unclosed `{`, a lone `}`, an empty or malformed `{}`), naming the byte offset.
pub fn parse(word: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut chars = word.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            '{' if chars.peek().is_some_and(|&(_, n)| n == '{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek().is_some_and(|&(_, n)| n == '}') => {
                chars.next();
                literal.push('}');
            }
            '{' => {
                let rest = &word[at + 1..];
                let Some(len) = rest.find('}') else {
                    return Err(format!(
                        "unclosed '{{' at byte {at} in {word:?} (write '{{{{' for a literal brace)"
                    ));
                };
                let name = &rest[..len];
                if name.is_empty()
                    || !name
                        .chars()
                        .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
                {
                    return Err(format!(
                        "'{{{name}}}' at byte {at} in {word:?} is not a placeholder name \
                         (write '{{{{' and '}}}}' for literal braces)"
                    ));
                }
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                parts.push(Part::Placeholder(name.to_string()));
                // Skip the name and its closing brace.
                for _ in 0..=name.chars().count() {
                    chars.next();
                }
            }
            '}' => {
                return Err(format!(
                    "lone '}}' at byte {at} in {word:?} (write '}}}}' for a literal brace)"
                ));
            }
            other => literal.push(other),
        }
    }
    if !literal.is_empty() {
        parts.push(Part::Literal(literal));
    }
    Ok(parts)
}

/// The placeholder names of one word, in order (empty when the word does not parse; [`parse`]
/// says why).
pub fn placeholders(word: &str) -> Vec<String> {
    parse(word)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| match p {
            Part::Placeholder(n) => Some(n),
            Part::Literal(_) => None,
        })
        .collect()
}

/// Fills one word: each placeholder is replaced by `value(name)`, escapes become single braces.
/// Errors name the word's problem or the first placeholder `value` has nothing for.
pub fn expand(word: &str, value: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(word.len());
    for part in parse(word)? {
        match part {
            Part::Literal(s) => out.push_str(&s),
            Part::Placeholder(name) => match value(&name) {
                Some(v) => out.push_str(&v),
                None => return Err(format!("{{{name}}} has no value here")),
            },
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        match name {
            "learning_rate" => Some("0.01".into()),
            "config_key" => Some("hex8_2p".into()),
            _ => None,
        }
    }

    #[test]
    fn doubled_braces_are_literal_braces() {
        assert_eq!(
            expand(r#"{{"lr": {learning_rate}}}"#, lookup).unwrap(),
            r#"{"lr": 0.01}"#
        );
        assert_eq!(expand("{{}}", lookup).unwrap(), "{}");
        assert_eq!(expand("{{config_key}}", lookup).unwrap(), "{config_key}");
        assert_eq!(expand("a{{{config_key}}}b", lookup).unwrap(), "a{hex8_2p}b");
        assert_eq!(expand("ünï{config_key}ß", lookup).unwrap(), "ünïhex8_2pß");
    }

    #[test]
    fn placeholders_skip_escapes() {
        assert_eq!(
            placeholders(r#"{{"x": {config_key}, "y": {learning_rate}}}"#),
            vec!["config_key", "learning_rate"]
        );
        assert!(placeholders("{{not_one}}").is_empty());
    }

    #[test]
    fn lone_and_malformed_braces_are_errors() {
        assert!(parse("{").unwrap_err().contains("unclosed"));
        assert!(parse("a}b").unwrap_err().contains("lone '}'"));
        assert!(parse("{}").unwrap_err().contains("not a placeholder name"));
        assert!(parse(r#"{"lr": 1}"#).unwrap_err().contains("'{{'"));
        assert!(expand("{seed}", lookup).unwrap_err().contains("{seed}"));
    }
}
