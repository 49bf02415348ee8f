//! Qualified table names, the one vocabulary shared by config, classification and ownership.
//!
//! Postgres folds unquoted identifiers to lower case and resolves unqualified names through
//! `search_path`; pgmm does not see a session's `search_path`, so an unqualified name is taken
//! to be in schema `public` (the default path). Quoted identifiers keep their case.

use std::fmt;

/// `schema.name`, both already case-folded as Postgres would store them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// Parses the operator's spelling in the config: `x`, `public.x`, `"Mixed".x`.
    /// Unquoted parts are lower-cased; an unqualified name lands in `public`.
    pub fn parse(text: &str) -> Option<Self> {
        let parts = split_identifiers(text)?;
        match parts.as_slice() {
            [name] => Some(Self::new("public", name.clone())),
            [schema, name] => Some(Self::new(schema.clone(), name.clone())),
            _ => None,
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Splits `a."B".c` into folded identifiers; `None` on empty parts or unbalanced quotes.
fn split_identifiers(text: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut chars = text.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    '"' => break,
                    c => part.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if c == '"' || c.is_whitespace() {
                    return None;
                }
                part.extend(c.to_lowercase());
                chars.next();
            }
        }
        if part.is_empty() {
            return None;
        }
        parts.push(part);
        match chars.next() {
            None => return Some(parts),
            Some('.') => continue,
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_folds() {
        assert_eq!(TableName::parse("X"), Some(TableName::new("public", "x")));
        assert_eq!(
            TableName::parse("Sales.Orders"),
            Some(TableName::new("sales", "orders"))
        );
        assert_eq!(
            TableName::parse("\"Sales\".\"a\"\"b\""),
            Some(TableName::new("Sales", "a\"b"))
        );
        assert_eq!(TableName::parse("a..b"), None);
        assert_eq!(TableName::parse("a.b.c"), None);
        assert_eq!(TableName::parse("\"open"), None);
        assert_eq!(TableName::parse(""), None);
    }

    #[test]
    fn displays_qualified() {
        assert_eq!(TableName::new("public", "x").to_string(), "public.x");
    }
}
