//! Environment overrides of configuration, one typed call per variable:
//! `env.apply("FLY_APP_NAME", &mut self.app_name)?`. Blank variables count as unset; a value
//! that does not parse is an error naming the variable.

use std::path::PathBuf;

use crate::{ConfigError, Secret};

/// A view of the process environment (or of a test's map).
pub struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Env<'a> {
    pub fn new(lookup: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Self { lookup }
    }

    /// The variable's value, `None` when unset or blank.
    pub fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|v| !v.trim().is_empty())
    }

    /// Overrides `target` with the variable `name` when it is set.
    pub fn apply<T: FromEnv>(&self, name: &str, target: &mut T) -> Result<(), ConfigError> {
        if let Some(value) = self.get(name) {
            *target = T::from_env(name, value)?;
        }
        Ok(())
    }
}

/// A configuration value that can be read from one environment variable.
pub trait FromEnv: Sized {
    /// Parses `value` of the variable `name`; the error names the variable.
    fn from_env(name: &str, value: String) -> Result<Self, ConfigError>;
}

impl FromEnv for String {
    fn from_env(_: &str, value: String) -> Result<Self, ConfigError> {
        Ok(value)
    }
}

impl FromEnv for Secret {
    fn from_env(_: &str, value: String) -> Result<Self, ConfigError> {
        Ok(Secret::new(value))
    }
}

impl FromEnv for PathBuf {
    fn from_env(_: &str, value: String) -> Result<Self, ConfigError> {
        Ok(PathBuf::from(value))
    }
}

impl FromEnv for bool {
    fn from_env(name: &str, value: String) -> Result<Self, ConfigError> {
        match value.trim() {
            "1" | "true" | "yes" => Ok(true),
            "0" | "false" | "no" => Ok(false),
            _ => Err(ConfigError::new(format!(
                "{name}={value:?} must be true or false"
            ))),
        }
    }
}

macro_rules! numbers {
    ($($t:ty),*) => {$(
        impl FromEnv for $t {
            fn from_env(name: &str, value: String) -> Result<Self, ConfigError> {
                value.trim().parse().map_err(|_| {
                    ConfigError::new(format!("{name}={value:?} is not a valid number"))
                })
            }
        }
    )*};
}
numbers!(u16, u32, u64, usize, f64);

/// A comma-separated list; empty items are dropped.
impl<T: FromEnv> FromEnv for Vec<T> {
    fn from_env(name: &str, value: String) -> Result<Self, ConfigError> {
        value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|item| T::from_env(name, item.to_owned()))
            .collect()
    }
}

impl<T: FromEnv> FromEnv for Option<T> {
    fn from_env(name: &str, value: String) -> Result<Self, ConfigError> {
        T::from_env(name, value).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_overrides_name_the_variable() {
        let vars = |name: &str| match name {
            "N" => Some("7".to_owned()),
            "BAD" => Some("lots".to_owned()),
            "LIST" => Some("a, b,,c".to_owned()),
            "BLANK" => Some("  ".to_owned()),
            "FLAG" => Some("yes".to_owned()),
            _ => None,
        };
        let env = Env::new(&vars);
        let mut n = 1u32;
        env.apply("N", &mut n).unwrap();
        assert_eq!(n, 7);
        let mut kept = Some("x".to_owned());
        env.apply("BLANK", &mut kept).unwrap();
        env.apply("UNSET", &mut kept).unwrap();
        assert_eq!(kept.as_deref(), Some("x"));
        let mut list: Vec<String> = Vec::new();
        env.apply("LIST", &mut list).unwrap();
        assert_eq!(list, ["a", "b", "c"]);
        let mut flag = false;
        env.apply("FLAG", &mut flag).unwrap();
        assert!(flag);
        let err = env.apply("BAD", &mut n).unwrap_err().to_string();
        assert!(err.contains("BAD") && err.contains("number"), "{err}");
    }
}
