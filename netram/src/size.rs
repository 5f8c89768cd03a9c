//! Sizes as people write them: `4096`, `512K`, `512M`, `2G`, `1GiB`, `1.5T`.

/// Parses a size in bytes. Suffixes K, M, G, T (optionally followed by `B` or `iB`, any case)
/// are powers of 1024; a plain number is bytes; fractions are allowed with a suffix.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("{text:?} is not a size: expected a number such as 512M or 2GiB"));
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        u => return Err(format!("{text:?}: unknown unit {u:?} (use K, M, G or T)")),
    };
    let bad = || format!("{text:?} is not a size: expected a number such as 512M or 2GiB");
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(1u64 << shift).ok_or_else(|| format!("{text:?} is too large"));
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    if shift == 0 || !f.is_finite() || f < 0.0 {
        return Err(bad());
    }
    #[allow(clippy::cast_precision_loss)]
    let bytes = f * (1u64 << shift) as f64;
    if bytes >= 1.8e19 {
        return Err(format!("{text:?} is too large"));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_like_people_write_them() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1gb"), Ok(1 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("1.5").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
