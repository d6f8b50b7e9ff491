//! The join rules: dispatchers join the regions in their token, contractors their own group.

use publisher_lib::contract::{Group, InvalidGroup};

use super::{Principal, Role};

/// Why a join was refused. The connection stays usable; the message goes back in the Completion.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefused {
    /// The region or contractor id is not a valid group id.
    #[error("invalid {what}: {reason}")]
    InvalidName {
        /// `region` or `contractor id`.
        what: &'static str,
        /// The rule that failed.
        reason: InvalidGroup,
    },
    /// A dispatcher asked for a region its token does not list.
    #[error("region '{0}' is not in your token")]
    RegionNotAllowed(String),
    /// A contractor asked for another contractor's group.
    #[error("you may join only your own contractor group")]
    NotYourGroup,
    /// The group family does not match the role in the token.
    #[error("a {role} may not join {family} groups")]
    WrongRole {
        /// The caller's role.
        role: &'static str,
        /// `dispatch` or `contractor`.
        family: &'static str,
    },
}

impl JoinRefused {
    /// Low-cardinality label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::InvalidName { .. } => "invalid_name",
            Self::RegionNotAllowed(_) => "region_not_allowed",
            Self::NotYourGroup => "not_your_group",
            Self::WrongRole { .. } => "wrong_role",
        }
    }
}

/// The dispatch group for `region`, if `principal` may join it.
///
/// # Errors
/// [`JoinRefused`] saying why not.
pub fn may_join_dispatch(principal: &Principal, region: &str) -> Result<Group, JoinRefused> {
    let group = Group::try_dispatch(region).map_err(|reason| JoinRefused::InvalidName {
        what: "region",
        reason,
    })?;
    may_join(principal, &group)?;
    Ok(group)
}

/// The contractor group for `id`, if `principal` may join it.
///
/// # Errors
/// [`JoinRefused`] saying why not.
pub fn may_join_contractor(principal: &Principal, id: &str) -> Result<Group, JoinRefused> {
    let group = Group::try_contractor(id).map_err(|reason| JoinRefused::InvalidName {
        what: "contractor id",
        reason,
    })?;
    may_join(principal, &group)?;
    Ok(group)
}

/// Whether `principal` may join `group`.
///
/// # Errors
/// [`JoinRefused`] saying why not.
pub fn may_join(principal: &Principal, group: &Group) -> Result<(), JoinRefused> {
    use publisher_lib::contract::GroupKind;
    match (&principal.role, group.kind()) {
        (Role::Dispatcher { regions }, GroupKind::Dispatch) => {
            if regions.iter().any(|r| r == group.id()) {
                Ok(())
            } else {
                Err(JoinRefused::RegionNotAllowed(group.id().to_owned()))
            }
        }
        (Role::Contractor { group: own }, GroupKind::Contractor) => {
            if own == group {
                Ok(())
            } else {
                Err(JoinRefused::NotYourGroup)
            }
        }
        (role, kind) => Err(JoinRefused::WrongRole {
            role: role.label(),
            family: match kind {
                GroupKind::Dispatch => "dispatch",
                GroupKind::Contractor => "contractor",
            },
        }),
    }
}
