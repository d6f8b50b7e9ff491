//! Who may connect and what they may join.
//!
//! Pure: verifies user tokens into a [`Principal`], decides joins, and signs the short-lived
//! connection tokens that negotiate hands out. Key material arrives as bytes from the shell; this
//! module reads no files and knows nothing of HTTP, sockets or Redis.

pub mod connection_token;
pub mod dev;
pub mod policy;
pub mod token;

pub use connection_token::ConnectionTokens;
pub use policy::{JoinRefused, may_join};
pub use token::{Algorithm, AuthError, Verifier};

use publisher_lib::contract::Group;

/// An authenticated user, as its token describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`.
    pub subject: String,
    /// What the user is, and so what it may join.
    pub role: Role,
    /// The first second (since the Unix epoch) at which the token is refused: `exp` plus the
    /// leeway, plus one. Open connections close then.
    pub valid_until: u64,
}

/// The two kinds of users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// May join `/dispatch/{region}` for the regions listed in its token.
    Dispatcher {
        /// The `regions` claim.
        regions: Vec<String>,
    },
    /// May join its own `/contractor/{id}` group only.
    Contractor {
        /// The group named by `contractorId` (or `sub`).
        group: Group,
    },
}

impl Role {
    /// Low-cardinality label for logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Dispatcher { .. } => "dispatcher",
            Self::Contractor { .. } => "contractor",
        }
    }
}

#[cfg(test)]
mod tests;
