//! Values from strangers (addresses, AUTH user names, file names, remote replies) written into
//! the text log so that no reader can be fooled: [`LogSafe`] escapes every character that could
//! end a field or start another (space, `"`, `=`, `\`) and every control or invisible format
//! character (CR, LF, U+2028…) as `\u{XX}`. A `key=value` reader — quote-aware or not — sees
//! exactly the fields mailroot wrote; letters of any script stay readable.

use std::fmt;

use crate::protocol::address::is_invisible;

/// Displays a string with the characters above escaped as `\u{hex}`.
pub struct LogSafe<'a>(pub &'a str);

impl fmt::Display for LogSafe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        if self.0.is_empty() {
            return f.write_str("-");
        }
        for c in self.0.chars() {
            let plain = match c {
                ' ' | '"' | '=' | '\\' => false,
                c if c.is_ascii() => c.is_ascii_graphic(),
                c => !c.is_control() && !is_invisible(c),
            };
            if plain {
                f.write_char(c)?;
            } else {
                write!(f, "\\u{{{:x}}}", c as u32)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        let cases = [
            ("a@b.test", "a@b.test"),
            ("ü@bücher.test", "ü@bücher.test"),
            ("", "-"),
            (
                r#""x\" result=\"accepted\" id=999"@d"#,
                r"\u{22}x\u{5c}\u{22}\u{20}result\u{3d}\u{5c}\u{22}accepted\u{5c}\u{22}\u{20}id\u{3d}999\u{22}@d",
            ),
            ("a\r\nINFO fake", r"a\u{d}\u{a}INFO\u{20}fake"),
            ("a\u{2028}b\u{202e}c\u{85}", r"a\u{2028}b\u{202e}c\u{85}"),
            ("tab\there", r"tab\u{9}here"),
        ];
        for (raw, want) in cases {
            let shown = LogSafe(raw).to_string();
            assert_eq!(shown, want, "{raw:?}");
            assert!(!shown.contains([' ', '"', '=', '\r', '\n']), "{shown}");
        }
    }
}
