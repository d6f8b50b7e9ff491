//! User tokens, join rules and connection tokens.

use publisher_lib::contract::Group;

use super::{Principal, Role};

const CONTRACTOR_ID: &str = "11111111-2222-4333-8444-555555555555";

fn dispatcher(regions: &[&str]) -> Principal {
    Principal {
        subject: "dispatcher-1".to_owned(),
        role: Role::Dispatcher {
            regions: regions.iter().map(|r| (*r).to_owned()).collect(),
        },
        valid_until: u64::MAX,
    }
}

fn contractor(id: &str) -> Principal {
    Principal {
        subject: "contractor-1".to_owned(),
        role: Role::Contractor {
            group: Group::try_contractor(id).unwrap(),
        },
        valid_until: u64::MAX,
    }
}

mod verifier {
    use std::time::{SystemTime, UNIX_EPOCH};

    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{EncodingKey, Header};
    use publisher_lib::contract::Group;
    use serde_json::{Value, json};

    use super::CONTRACTOR_ID;
    use crate::auth::token::{DEFAULT_LEEWAY_SECS, KeyError, MIN_SECRET_BYTES};
    use crate::auth::{Algorithm, AuthError, Principal, Role, Verifier};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OTHER_SECRET: &[u8] = b"fedcba9876543210fedcba9876543210";

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn in_an_hour() -> u64 {
        now() + 3600
    }

    fn sign(algorithm: jsonwebtoken::Algorithm, secret: &[u8], claims: &Value) -> String {
        jsonwebtoken::encode(
            &Header::new(algorithm),
            claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn hs256(claims: &Value) -> String {
        sign(jsonwebtoken::Algorithm::HS256, SECRET, claims)
    }

    fn verifier(issuer: Option<&str>, audience: Option<&str>) -> Verifier {
        Verifier::try_new(Algorithm::Hs256, SECRET, issuer, audience).unwrap()
    }

    /// Verifies `token` and compares the outcome with `expected`.
    fn check(verifier: &Verifier, token: &str, expected: Result<Principal, AuthError>) {
        assert_eq!(verifier.verify(token), expected, "for {token}");
    }

    fn dispatcher_claims(exp: u64) -> Value {
        json!({"sub": "d-1", "role": "dispatcher", "regions": ["west", "east"], "exp": exp})
    }

    #[test]
    fn a_valid_dispatcher_token_names_its_regions() {
        let exp = in_an_hour();
        check(
            &verifier(None, None),
            &hs256(&dispatcher_claims(exp)),
            Ok(Principal {
                subject: "d-1".to_owned(),
                role: Role::Dispatcher {
                    regions: vec!["west".to_owned(), "east".to_owned()],
                },
                valid_until: exp + DEFAULT_LEEWAY_SECS + 1,
            }),
        );
    }

    #[test]
    fn a_dispatcher_token_without_regions_may_join_none() {
        let exp = in_an_hour();
        check(
            &verifier(None, None),
            &hs256(&json!({"sub": "d-2", "role": "dispatcher", "exp": exp, "extra": [1]})),
            Ok(Principal {
                subject: "d-2".to_owned(),
                role: Role::Dispatcher { regions: vec![] },
                valid_until: exp + DEFAULT_LEEWAY_SECS + 1,
            }),
        );
    }

    #[test]
    fn a_valid_contractor_token_names_its_group_in_canonical_form() {
        let exp = in_an_hour();
        check(
            &verifier(None, None),
            &hs256(&json!({
                "sub": "user-9",
                "role": "contractor",
                "contractorId": CONTRACTOR_ID.to_uppercase(),
                "exp": exp,
            })),
            Ok(Principal {
                subject: "user-9".to_owned(),
                role: Role::Contractor {
                    group: Group::try_contractor(CONTRACTOR_ID).unwrap(),
                },
                valid_until: exp + DEFAULT_LEEWAY_SECS + 1,
            }),
        );
    }

    #[test]
    fn a_contractor_token_without_contractor_id_uses_its_subject() {
        let exp = in_an_hour();
        check(
            &verifier(None, None),
            &hs256(&json!({"sub": CONTRACTOR_ID, "role": "contractor", "exp": exp})),
            Ok(Principal {
                subject: CONTRACTOR_ID.to_owned(),
                role: Role::Contractor {
                    group: Group::try_contractor(CONTRACTOR_ID).unwrap(),
                },
                valid_until: exp + DEFAULT_LEEWAY_SECS + 1,
            }),
        );
    }

    #[test]
    fn a_contractor_id_that_cannot_name_a_group_is_refused() {
        check(
            &verifier(None, None),
            &hs256(
                &json!({"sub": "c", "role": "contractor", "contractorId": "a/b", "exp": in_an_hour()}),
            ),
            Err(AuthError::BadClaims(
                "contractorId may contain only letters, digits, '-', '_' and '.'".to_owned(),
            )),
        );
        check(
            &verifier(None, None),
            &hs256(&json!({"sub": "", "role": "contractor", "exp": in_an_hour()})),
            Err(AuthError::BadClaims(
                "contractorId must not be empty".to_owned(),
            )),
        );
    }

    #[test]
    fn an_expired_token_is_refused() {
        check(
            &verifier(None, None),
            &hs256(&dispatcher_claims(now() - 3600)),
            Err(AuthError::Expired),
        );
        check(
            &verifier(None, None),
            &hs256(&dispatcher_claims(now() - 120)),
            Err(AuthError::Expired),
        );
    }

    #[test]
    fn a_token_that_just_expired_is_still_accepted_within_the_clock_skew_leeway() {
        let exp = now() - 5;
        let got = verifier(None, None).verify(&hs256(&dispatcher_claims(exp)));
        assert_eq!(
            got.map(|p| p.valid_until),
            Ok(exp + DEFAULT_LEEWAY_SECS + 1)
        );
    }

    fn dispatcher_claims_not_before(nbf: Value) -> Value {
        json!({"sub": "d-1", "role": "dispatcher", "regions": ["west"], "exp": in_an_hour(), "nbf": nbf})
    }

    #[test]
    fn a_token_not_valid_yet_is_refused_beyond_the_leeway() {
        check(
            &verifier(None, None),
            &hs256(&dispatcher_claims_not_before(json!(now() + 3600))),
            Err(AuthError::NotYetValid),
        );
        check(
            &verifier(None, None),
            &hs256(&dispatcher_claims_not_before(json!(
                now() + DEFAULT_LEEWAY_SECS + 60
            ))),
            Err(AuthError::NotYetValid),
        );
        assert_eq!(AuthError::NotYetValid.label(), "not_yet_valid");
    }

    #[test]
    fn a_token_whose_nbf_is_past_or_within_the_leeway_is_accepted() {
        for nbf in [now() - 3600, now(), now() + DEFAULT_LEEWAY_SECS - 10] {
            let got =
                verifier(None, None).verify(&hs256(&dispatcher_claims_not_before(json!(nbf))));
            assert!(got.is_ok(), "nbf {nbf}: {got:?}");
        }
    }

    #[test]
    fn a_token_whose_nbf_is_not_a_number_is_refused() {
        check(
            &verifier(None, None),
            &hs256(&dispatcher_claims_not_before(json!("tomorrow"))),
            Err(AuthError::BadClaims(
                "claim `nbf` is not a number of seconds".to_owned(),
            )),
        );
    }

    #[test]
    fn hs384_and_hs512_signed_with_the_same_secret_are_refused() {
        for algorithm in [
            jsonwebtoken::Algorithm::HS384,
            jsonwebtoken::Algorithm::HS512,
        ] {
            check(
                &verifier(None, None),
                &sign(algorithm, SECRET, &dispatcher_claims(in_an_hour())),
                Err(AuthError::WrongAlgorithm),
            );
        }
    }

    #[test]
    fn an_unsigned_token_with_algorithm_none_is_malformed() {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = URL_SAFE_NO_PAD.encode(dispatcher_claims(in_an_hour()).to_string());
        check(
            &verifier(None, None),
            &format!("{header}.{claims}."),
            Err(AuthError::Malformed),
        );
    }

    #[test]
    fn a_token_whose_header_is_not_a_jwt_header_is_malformed() {
        let claims = URL_SAFE_NO_PAD.encode(dispatcher_claims(in_an_hour()).to_string());
        for header in [&b"hello"[..], b"{}", br#"{"alg":"XX999"}"#] {
            check(
                &verifier(None, None),
                &format!("{}.{claims}.c2ln", URL_SAFE_NO_PAD.encode(header)),
                Err(AuthError::Malformed),
            );
        }
    }

    #[test]
    fn a_token_signed_with_another_secret_has_a_bad_signature() {
        check(
            &verifier(None, None),
            &sign(
                jsonwebtoken::Algorithm::HS256,
                OTHER_SECRET,
                &dispatcher_claims(in_an_hour()),
            ),
            Err(AuthError::BadSignature),
        );
    }

    #[test]
    fn a_token_whose_claims_were_changed_after_signing_has_a_bad_signature() {
        let token = hs256(
            &json!({"sub": "d-1", "role": "dispatcher", "regions": ["west"], "exp": in_an_hour()}),
        );
        let mut parts = token.split('.');
        let (header, _, signature) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let forged = URL_SAFE_NO_PAD.encode(
            json!({"sub": "d-1", "role": "dispatcher", "regions": ["west", "north"], "exp": in_an_hour()})
                .to_string(),
        );
        check(
            &verifier(None, None),
            &format!("{header}.{forged}.{signature}"),
            Err(AuthError::BadSignature),
        );
    }

    #[test]
    fn an_empty_token_is_missing() {
        check(&verifier(None, None), "", Err(AuthError::Missing));
    }

    #[test]
    fn garbage_is_malformed() {
        for garbage in ["not-a-token", "a.b", "a.b.c", "...", "Bearer x.y.z"] {
            check(&verifier(None, None), garbage, Err(AuthError::Malformed));
        }
    }

    #[test]
    fn a_token_without_exp_or_sub_is_refused() {
        for claims in [
            json!({"sub": "d-1", "role": "dispatcher"}),
            json!({"role": "dispatcher", "exp": in_an_hour()}),
        ] {
            let got = verifier(None, None).verify(&hs256(&claims));
            assert!(
                matches!(got, Err(AuthError::BadClaims(_))),
                "for {claims}: {got:?}"
            );
        }
    }

    #[test]
    fn a_token_without_a_known_role_is_refused() {
        check(
            &verifier(None, None),
            &hs256(&json!({"sub": "a-1", "role": "admin", "exp": in_an_hour()})),
            Err(AuthError::BadClaims(
                "role must be dispatcher or contractor".to_owned(),
            )),
        );
        check(
            &verifier(None, None),
            &hs256(&json!({"sub": "a-1", "role": "Dispatcher", "exp": in_an_hour()})),
            Err(AuthError::BadClaims(
                "role must be dispatcher or contractor".to_owned(),
            )),
        );
        check(
            &verifier(None, None),
            &hs256(&json!({"sub": "a-1", "exp": in_an_hour()})),
            Err(AuthError::BadClaims("missing field `role`".to_owned())),
        );
    }

    /// `verifier` accepts a dispatcher token whose `claim` is one of `accepted`, refuses one
    /// whose `claim` is `refused` with `wrong`, and a token without `claim` as missing it.
    fn check_required_claim(
        verifier: &Verifier,
        claim: &str,
        accepted: &[Value],
        refused: Value,
        wrong: AuthError,
    ) {
        let with_claim = |value: &Value| {
            let mut claims = dispatcher_claims(in_an_hour());
            claims[claim] = value.clone();
            hs256(&claims)
        };
        for value in accepted {
            let got = verifier.verify(&with_claim(value));
            assert_eq!(got.map(|p| p.subject), Ok("d-1".to_owned()), "for {value}");
        }
        check(verifier, &with_claim(&refused), Err(wrong));
        check(
            verifier,
            &hs256(&dispatcher_claims(in_an_hour())),
            Err(AuthError::BadClaims(format!("missing claim `{claim}`"))),
        );
    }

    #[test]
    fn the_issuer_is_enforced_when_configured() {
        check_required_claim(
            &verifier(Some("https://idp.example.com"), None),
            "iss",
            &[json!("https://idp.example.com")],
            json!("https://evil.example.com"),
            AuthError::WrongIssuer,
        );
    }

    #[test]
    fn the_issuer_is_not_checked_when_not_configured() {
        let mut claims = dispatcher_claims(in_an_hour());
        claims["iss"] = json!("anyone");
        claims["aud"] = json!("anything");
        let got = verifier(None, None).verify(&hs256(&claims));
        assert_eq!(got.map(|p| p.subject), Ok("d-1".to_owned()));
    }

    #[test]
    fn the_audience_is_enforced_when_configured() {
        check_required_claim(
            &verifier(None, Some("gateway")),
            "aud",
            &[json!("gateway"), json!(["other", "gateway"])],
            json!("billing"),
            AuthError::WrongAudience,
        );
    }

    #[test]
    fn a_secret_shorter_than_32_bytes_is_refused() {
        let short = &SECRET[..MIN_SECRET_BYTES - 1];
        let got = Verifier::try_new(Algorithm::Hs256, short, None, None);
        assert!(matches!(got, Err(KeyError::ShortSecret(31))), "{got:?}");
        assert!(
            Verifier::try_new(Algorithm::Hs256, &SECRET[..MIN_SECRET_BYTES], None, None).is_ok()
        );
    }

    #[test]
    fn a_public_key_that_is_not_pem_is_refused() {
        for algorithm in [Algorithm::Rs256, Algorithm::Es256] {
            let got = Verifier::try_new(algorithm, b"not a pem key", None, None);
            assert!(
                matches!(got, Err(KeyError::BadPublicKey { algorithm: a, .. }) if a == algorithm),
                "{got:?}"
            );
        }
    }

    #[test]
    fn algorithm_names_are_read_case_insensitively_and_none_is_not_one() {
        let parse = |s: &str| s.parse::<Algorithm>();
        assert_eq!(parse("HS256"), Ok(Algorithm::Hs256));
        assert_eq!(parse("rs256"), Ok(Algorithm::Rs256));
        assert_eq!(parse("Es256"), Ok(Algorithm::Es256));
        assert_eq!(
            parse("none"),
            Err("unsupported algorithm `none`; use HS256, RS256 or ES256".to_owned())
        );
        assert_eq!(
            parse("HS512"),
            Err("unsupported algorithm `HS512`; use HS256, RS256 or ES256".to_owned())
        );
    }
}

mod policy {
    use publisher_lib::contract::InvalidGroup;

    use super::{CONTRACTOR_ID, contractor, dispatcher};
    use crate::auth::Principal;
    use crate::auth::policy::{JoinRefused, may_join_contractor, may_join_dispatch};

    /// What a client asks to join.
    #[derive(Debug, Clone, Copy)]
    enum Ask<'a> {
        Dispatch(&'a str),
        Contractor(&'a str),
    }

    /// Asks the join rules and compares the outcome (`Ok` = the group name) with `expected`.
    fn check(principal: &Principal, ask: Ask<'_>, expected: Result<&str, JoinRefused>) {
        let got = match ask {
            Ask::Dispatch(region) => may_join_dispatch(principal, region),
            Ask::Contractor(id) => may_join_contractor(principal, id),
        };
        assert_eq!(
            got.map(|g| g.name().to_owned()),
            expected.map(str::to_owned),
            "for {ask:?} by {principal:?}"
        );
    }

    #[test]
    fn a_dispatcher_joins_the_regions_in_its_token() {
        let principal = dispatcher(&["west", "east"]);
        check(&principal, Ask::Dispatch("west"), Ok("/dispatch/west"));
        check(&principal, Ask::Dispatch("east"), Ok("/dispatch/east"));
    }

    #[test]
    fn a_dispatcher_cannot_join_a_region_outside_its_token() {
        let principal = dispatcher(&["west"]);
        check(
            &principal,
            Ask::Dispatch("north"),
            Err(JoinRefused::RegionNotAllowed("north".to_owned())),
        );
        check(
            &principal,
            Ask::Dispatch("West"),
            Err(JoinRefused::RegionNotAllowed("West".to_owned())),
        );
        check(
            &dispatcher(&[]),
            Ask::Dispatch("west"),
            Err(JoinRefused::RegionNotAllowed("west".to_owned())),
        );
    }

    #[test]
    fn a_region_that_cannot_name_a_group_is_invalid() {
        let principal = dispatcher(&["west", "we st"]);
        check(
            &principal,
            Ask::Dispatch("we st"),
            Err(JoinRefused::InvalidName {
                what: "region",
                reason: InvalidGroup::BadCharacter,
            }),
        );
        check(
            &principal,
            Ask::Dispatch(""),
            Err(JoinRefused::InvalidName {
                what: "region",
                reason: InvalidGroup::Empty,
            }),
        );
        check(
            &principal,
            Ask::Dispatch("../west"),
            Err(JoinRefused::InvalidName {
                what: "region",
                reason: InvalidGroup::BadCharacter,
            }),
        );
    }

    #[test]
    fn a_dispatcher_cannot_join_contractor_groups() {
        check(
            &dispatcher(&["west"]),
            Ask::Contractor(CONTRACTOR_ID),
            Err(JoinRefused::WrongRole {
                role: "dispatcher",
                family: "contractor",
            }),
        );
    }

    #[test]
    fn a_contractor_joins_its_own_group_in_any_uuid_case() {
        let principal = contractor(CONTRACTOR_ID);
        let own = format!("/contractor/{CONTRACTOR_ID}");
        check(&principal, Ask::Contractor(CONTRACTOR_ID), Ok(&own));
        check(
            &principal,
            Ask::Contractor(&CONTRACTOR_ID.to_uppercase()),
            Ok(&own),
        );
        check(
            &contractor(&CONTRACTOR_ID.to_uppercase()),
            Ask::Contractor(CONTRACTOR_ID),
            Ok(&own),
        );
    }

    #[test]
    fn a_contractor_cannot_join_another_contractors_group() {
        check(
            &contractor(CONTRACTOR_ID),
            Ask::Contractor("22222222-2222-4333-8444-555555555555"),
            Err(JoinRefused::NotYourGroup),
        );
        check(
            &contractor("c-7"),
            Ask::Contractor("C-7"),
            Err(JoinRefused::NotYourGroup),
        );
    }

    #[test]
    fn a_contractor_cannot_join_dispatch_groups() {
        check(
            &contractor(CONTRACTOR_ID),
            Ask::Dispatch("west"),
            Err(JoinRefused::WrongRole {
                role: "contractor",
                family: "dispatch",
            }),
        );
    }

    #[test]
    fn a_contractor_id_that_cannot_name_a_group_is_invalid() {
        check(
            &contractor(CONTRACTOR_ID),
            Ask::Contractor("a/b"),
            Err(JoinRefused::InvalidName {
                what: "contractor id",
                reason: InvalidGroup::BadCharacter,
            }),
        );
        check(
            &contractor(CONTRACTOR_ID),
            Ask::Contractor(&"x".repeat(65)),
            Err(JoinRefused::InvalidName {
                what: "contractor id",
                reason: InvalidGroup::TooLong(65),
            }),
        );
    }

    #[test]
    fn refusals_explain_themselves() {
        let cases = [
            (
                JoinRefused::RegionNotAllowed("north".to_owned()),
                "region 'north' is not in your token",
                "region_not_allowed",
            ),
            (
                JoinRefused::NotYourGroup,
                "you may join only your own contractor group",
                "not_your_group",
            ),
            (
                JoinRefused::WrongRole {
                    role: "contractor",
                    family: "dispatch",
                },
                "a contractor may not join dispatch groups",
                "wrong_role",
            ),
            (
                JoinRefused::InvalidName {
                    what: "region",
                    reason: InvalidGroup::Empty,
                },
                "invalid region: must not be empty",
                "invalid_name",
            ),
        ];
        for (refusal, message, label) in cases {
            assert_eq!(
                (refusal.to_string().as_str(), refusal.label()),
                (message, label)
            );
        }
    }
}

mod connection_tokens {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use crate::auth::ConnectionTokens;
    use crate::auth::connection_token::{ConnectionTokenError, Negotiated, TOKEN_TTL_SECS};

    const KEY: &[u8] = b"connection-token-key-shared-by-replicas";
    const ID: [u8; 16] = *b"0123456789abcdef";
    const NOW: u64 = 1_750_000_000;

    fn issued() -> Negotiated {
        ConnectionTokens::new(KEY).issue(ID, "alice", NOW)
    }

    /// Verifies `token` as presented by `subject` at `now` and compares with `expected`.
    fn check(token: &str, subject: &str, now: u64, expected: Result<&str, ConnectionTokenError>) {
        let got = ConnectionTokens::new(KEY).verify(token, subject, now);
        assert_eq!(
            got,
            expected.map(str::to_owned),
            "for {token:?} by {subject} at {now}"
        );
    }

    /// Decodes the two halves of a token, lets `change` alter them, and encodes them again.
    fn tamper(token: &str, change: impl FnOnce(&mut Vec<u8>, &mut Vec<u8>)) -> String {
        let (payload, mac) = token.split_once('.').unwrap();
        let mut payload = URL_SAFE_NO_PAD.decode(payload).unwrap();
        let mut mac = URL_SAFE_NO_PAD.decode(mac).unwrap();
        change(&mut payload, &mut mac);
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(mac)
        )
    }

    #[test]
    fn an_issued_token_verifies_to_its_connection_id() {
        let negotiated = issued();
        assert_eq!(negotiated.connection_id, URL_SAFE_NO_PAD.encode(ID));
        assert_eq!(negotiated.connection_id.len(), 22);
        check(
            &negotiated.connection_token,
            "alice",
            NOW,
            Ok(&negotiated.connection_id),
        );
    }

    #[test]
    fn another_replica_with_the_same_key_accepts_the_token() {
        let token = ConnectionTokens::new(KEY)
            .issue(ID, "alice", NOW)
            .connection_token;
        let other_replica = ConnectionTokens::new(KEY);
        assert!(other_replica.verify(&token, "alice", NOW + 1).is_ok());
        let other_key = ConnectionTokens::new(b"another-key");
        assert_eq!(
            other_key.verify(&token, "alice", NOW + 1),
            Err(ConnectionTokenError::Unknown)
        );
    }

    #[test]
    fn a_token_stays_valid_for_its_ttl_and_then_expires() {
        let negotiated = issued();
        let token = &negotiated.connection_token;
        check(
            token,
            "alice",
            NOW + TOKEN_TTL_SECS,
            Ok(&negotiated.connection_id),
        );
        check(
            token,
            "alice",
            NOW + TOKEN_TTL_SECS + 1,
            Err(ConnectionTokenError::Expired),
        );
    }

    #[test]
    fn a_token_presented_by_another_subject_is_unknown() {
        let token = issued().connection_token;
        check(&token, "mallory", NOW, Err(ConnectionTokenError::Unknown));
        check(&token, "alice ", NOW, Err(ConnectionTokenError::Unknown));
        check(&token, "", NOW, Err(ConnectionTokenError::Unknown));
    }

    #[test]
    fn a_tampered_payload_is_unknown() {
        let token = issued().connection_token;
        let later = tamper(&token, |payload, _| {
            payload[16..24].copy_from_slice(&(NOW + 86_400).to_be_bytes());
        });
        check(&later, "alice", NOW, Err(ConnectionTokenError::Unknown));
        let other_id = tamper(&token, |payload, _| payload[0] ^= 1);
        check(&other_id, "alice", NOW, Err(ConnectionTokenError::Unknown));
        let truncated = tamper(&token, |payload, _| payload.truncate(24));
        check(&truncated, "alice", NOW, Err(ConnectionTokenError::Unknown));
        let stateful = tamper(&token, |payload, _| payload[24] = 1);
        check(&stateful, "alice", NOW, Err(ConnectionTokenError::Unknown));
    }

    #[test]
    fn a_stateful_token_says_so_and_opens_after_its_expiry() {
        let tokens = ConnectionTokens::new(KEY);
        let stateful = tokens.issue_for(ID, "alice", NOW, true);
        let claims = tokens.open(&stateful.connection_token, "alice").unwrap();
        assert!(claims.stateful);
        assert_eq!(claims.connection_id, stateful.connection_id);
        assert_eq!(claims.expires, NOW + TOKEN_TTL_SECS);
        assert_eq!(
            tokens.verify(
                &stateful.connection_token,
                "alice",
                NOW + TOKEN_TTL_SECS + 1
            ),
            Err(ConnectionTokenError::Expired),
            "too old for a new connection"
        );
        assert_eq!(
            tokens.open(&stateful.connection_token, "mallory"),
            Err(ConnectionTokenError::Unknown)
        );
        let plain = tokens.issue(ID, "alice", NOW);
        assert!(
            !tokens
                .open(&plain.connection_token, "alice")
                .unwrap()
                .stateful
        );
    }

    #[test]
    fn a_tampered_mac_is_unknown() {
        let token = issued().connection_token;
        let flipped = tamper(&token, |_, mac| mac[31] ^= 0x80);
        check(&flipped, "alice", NOW, Err(ConnectionTokenError::Unknown));
        let truncated = tamper(&token, |_, mac| mac.truncate(16));
        check(&truncated, "alice", NOW, Err(ConnectionTokenError::Unknown));
        let missing = tamper(&token, |_, mac| mac.clear());
        check(&missing, "alice", NOW, Err(ConnectionTokenError::Unknown));
    }

    #[test]
    fn garbage_is_unknown() {
        let token = issued().connection_token;
        let with_padding = format!("{token}=");
        let with_third_part = format!("{token}.x");
        for garbage in [
            "",
            ".",
            "abc",
            "a.b",
            "!!!.???",
            with_padding.as_str(),
            with_third_part.as_str(),
        ] {
            check(garbage, "alice", NOW, Err(ConnectionTokenError::Unknown));
        }
    }

    #[test]
    fn tokens_for_different_connections_differ() {
        let tokens = ConnectionTokens::new(KEY);
        let a = tokens.issue(ID, "alice", NOW);
        let b = tokens.issue(*b"fedcba9876543210", "alice", NOW);
        assert_ne!(a.connection_id, b.connection_id);
        assert_ne!(a.connection_token, b.connection_token);
        assert_eq!(
            tokens.verify(&b.connection_token, "alice", NOW),
            Ok(b.connection_id)
        );
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let debug = format!("{:?}", ConnectionTokens::new(KEY));
        assert_eq!(debug, "ConnectionTokens(<key>)");
    }
}

#[test]
fn a_token_is_refused_from_the_second_its_connections_are_closed() {
    use std::time::{SystemTime, UNIX_EPOCH};

    use crate::auth::dev::{TokenClaims, mint};
    use crate::auth::{Algorithm, AuthError, Verifier};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token_expiring = |exp| {
        mint(
            SECRET,
            &TokenClaims {
                sub: "d-1".to_owned(),
                role: "dispatcher".to_owned(),
                regions: vec!["west".to_owned()],
                contractor_id: None,
                exp,
                iss: None,
                aud: None,
            },
        )
        .unwrap()
    };
    let verifier = Verifier::try_new(Algorithm::Hs256, SECRET, None, None)
        .unwrap()
        .with_leeway(0);
    // Accepted while now <= exp: connections close at exp + 1...
    let accepted = verifier.verify(&token_expiring(now)).unwrap();
    assert_eq!(accepted.valid_until, now + 1);
    // ...which is exactly when the same token is refused.
    assert_eq!(
        verifier.verify(&token_expiring(now - 1)),
        Err(AuthError::Expired)
    );
}
