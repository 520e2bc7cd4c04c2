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

/// What is wrong with a template word, or why it cannot be filled in. Each names the word (as
/// written) and, for a brace problem, the byte offset where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{` with no `}` after it.
    #[error("unclosed '{{' at byte {at} in {word:?} (write '{{{{' for a literal brace)")]
    Unclosed {
        /// The template word.
        word: String,
        /// Byte offset of the `{`.
        at: usize,
    },
    /// A `{...}` whose inside is empty or not a placeholder name (`[a-z0-9_]+`).
    #[error(
        "'{{{name}}}' at byte {at} in {word:?} is not a placeholder name \
         (write '{{{{' and '}}}}' for literal braces)"
    )]
    NotAName {
        /// The template word.
        word: String,
        /// Byte offset of the `{`.
        at: usize,
        /// What stands between the braces.
        name: String,
    },
    /// A `}` that closes nothing.
    #[error("lone '}}' at byte {at} in {word:?} (write '}}}}' for a literal brace)")]
    LoneClose {
        /// The template word.
        word: String,
        /// Byte offset of the `}`.
        at: usize,
    },
    /// [`expand`] was given no value for this placeholder.
    #[error("{{{name}}} has no value here")]
    NoValue {
        /// The placeholder's name, without braces.
        name: String,
    },
}

/// Splits one word of a template into literal text and placeholders, or says what is wrong with
/// it (an unclosed `{`, a lone `}`, an empty or malformed `{}`), naming the byte offset.
pub fn parse(word: &str) -> Result<Vec<Part>, TemplateError> {
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
                    return Err(TemplateError::Unclosed {
                        word: word.to_string(),
                        at,
                    });
                };
                let name = &rest[..len];
                if name.is_empty()
                    || !name
                        .chars()
                        .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
                {
                    return Err(TemplateError::NotAName {
                        word: word.to_string(),
                        at,
                        name: name.to_string(),
                    });
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
                return Err(TemplateError::LoneClose {
                    word: word.to_string(),
                    at,
                });
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
pub fn expand(word: &str, value: impl Fn(&str) -> Option<String>) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(word.len());
    for part in parse(word)? {
        match part {
            Part::Literal(s) => out.push_str(&s),
            Part::Placeholder(name) => match value(&name) {
                Some(v) => out.push_str(&v),
                None => return Err(TemplateError::NoValue { name }),
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
        let msg = |r: Result<Vec<Part>, TemplateError>| r.unwrap_err().to_string();
        assert_eq!(
            msg(parse("{")),
            r#"unclosed '{' at byte 0 in "{" (write '{{' for a literal brace)"#
        );
        assert_eq!(
            msg(parse("a}b")),
            r#"lone '}' at byte 1 in "a}b" (write '}}' for a literal brace)"#
        );
        assert_eq!(
            msg(parse("{}")),
            r#"'{}' at byte 0 in "{}" is not a placeholder name (write '{{' and '}}' for literal braces)"#
        );
        assert!(msg(parse(r#"{"lr": 1}"#)).contains("'{{'"));
        assert_eq!(
            parse("x{a-b}"),
            Err(TemplateError::NotAName {
                word: "x{a-b}".into(),
                at: 1,
                name: "a-b".into()
            })
        );
        assert_eq!(
            expand("{seed}", lookup).unwrap_err().to_string(),
            "{seed} has no value here"
        );
    }
}
