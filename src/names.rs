//! Names of lans and ports. They become file names in the run directory,
//! so the rules here are what keeps a request from steering a path outside it.

pub const MAX_NAME_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("name {0:?} must start with a-z or 0-9 and contain only a-z, 0-9, '_', '.', '-'")]
    BadCharacter(String),
}

/// Checks `[a-z0-9][a-z0-9_.-]*`, at most 32 characters.
pub fn check_name(name: &str) -> Result<(), NameError> {
    let bytes = name.as_bytes();
    let Some(&first) = bytes.first() else {
        return Err(NameError::Empty);
    };
    if bytes.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(first) || !bytes.iter().all(|&b| alnum(b) || b"_.-".contains(&b)) {
        return Err(NameError::BadCharacter(name.chars().take(40).collect()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for ok in ["a", "lan0", "r1.eth0", "x_y-z", "0"] {
            check_name(ok).unwrap();
        }
    }

    #[test]
    fn rejects_paths_and_junk() {
        for bad in [
            "",
            "..",
            "../x",
            "a/b",
            ".hidden",
            "-x",
            "_x",
            "A",
            "lan 0",
            "é",
            "a\0b",
            "api.sock\n",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(check_name(&"a".repeat(33)), Err(NameError::TooLong));
        check_name(&"a".repeat(32)).unwrap();
    }
}
