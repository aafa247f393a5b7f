use super::*;

#[test]
fn keys_with_nul_are_hashed_and_cannot_collide_with_real_keys() {
    assert_eq!(storable_key("MMS_MO|N401|abc"), "MMS_MO|N401|abc");
    let hashed = storable_key("MMS_MO|N401|a\0b");
    assert!(hashed.starts_with("nul-sha256:"), "{hashed}");
    assert!(!hashed.contains('|') && !hashed.contains('\0'));
    assert_ne!(hashed, storable_key("MMS_MO|N401|a\0c"));
}

#[test]
fn nul_characters_are_replaced_in_text() {
    assert_eq!(clean("a\0b"), "a\u{FFFD}b");
    assert_eq!(clean("plain"), "plain");
}
