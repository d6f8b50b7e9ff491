//! Group names: `/dispatch/{region}` and `/contractor/{id}`.

use std::fmt;

/// Longest region or contractor id accepted in a group name.
pub const MAX_GROUP_ID_LEN: usize = 64;

/// A validated group name. Cheap to clone; compared and hashed by its full name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Group {
    name: Box<str>,
    kind: GroupKind,
}

/// The two families of groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GroupKind {
    /// `/dispatch/{region}`: dispatchers of a region.
    Dispatch,
    /// `/contractor/{id}`: one contractor's own devices.
    Contractor,
}

/// Why a region, contractor id or group name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidGroup {
    /// The id part is empty.
    #[error("must not be empty")]
    Empty,
    /// The id part is too long.
    #[error("is {0} bytes long; at most {MAX_GROUP_ID_LEN} are allowed")]
    TooLong(usize),
    /// The id part has a character outside `A-Z a-z 0-9 - _ .`.
    #[error("may contain only letters, digits, '-', '_' and '.'")]
    BadCharacter,
    /// The name starts with neither `/dispatch/` nor `/contractor/`.
    #[error("must start with /dispatch/ or /contractor/")]
    UnknownPrefix,
}

impl Group {
    /// The dispatch group of a region, `/dispatch/{region}`.
    ///
    /// # Errors
    /// [`InvalidGroup`] when the region is empty, too long or has other characters than
    /// letters, digits, `-`, `_` and `.`.
    pub fn try_dispatch(region: &str) -> Result<Self, InvalidGroup> {
        check_id(region)?;
        Ok(Self::new(GroupKind::Dispatch, region))
    }

    /// A contractor's own group, `/contractor/{id}`.
    ///
    /// An id that is a UUID is written in its canonical lowercase form, so a token carrying
    /// `ABC…` and an event carrying `abc…` name the same group.
    ///
    /// # Errors
    /// [`InvalidGroup`] under the same rules as [`Group::try_dispatch`].
    pub fn try_contractor(id: &str) -> Result<Self, InvalidGroup> {
        check_id(id)?;
        match uuid::Uuid::try_parse(id) {
            Ok(uuid) => Ok(Self::new(GroupKind::Contractor, &uuid.to_string())),
            Err(_) => Ok(Self::new(GroupKind::Contractor, id)),
        }
    }

    /// Parses a full group name such as `/dispatch/west`.
    ///
    /// # Errors
    /// [`InvalidGroup`] when the prefix is unknown or the id part is invalid.
    pub fn try_from_name(name: &str) -> Result<Self, InvalidGroup> {
        if let Some(region) = name.strip_prefix(GroupKind::Dispatch.prefix()) {
            Self::try_dispatch(region)
        } else if let Some(id) = name.strip_prefix(GroupKind::Contractor.prefix()) {
            Self::try_contractor(id)
        } else {
            Err(InvalidGroup::UnknownPrefix)
        }
    }

    /// The full name, e.g. `/dispatch/west`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The region or contractor id part of the name.
    pub fn id(&self) -> &str {
        &self.name[self.kind.prefix().len()..]
    }

    /// Which family the group belongs to.
    pub fn kind(&self) -> GroupKind {
        self.kind
    }

    fn new(kind: GroupKind, id: &str) -> Self {
        let name = format!("{}{id}", kind.prefix()).into_boxed_str();
        Self { name, kind }
    }
}

impl GroupKind {
    /// The name prefix, including both slashes.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Dispatch => "/dispatch/",
            Self::Contractor => "/contractor/",
        }
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

fn check_id(id: &str) -> Result<(), InvalidGroup> {
    if id.is_empty() {
        return Err(InvalidGroup::Empty);
    }
    if id.len() > MAX_GROUP_ID_LEN {
        return Err(InvalidGroup::TooLong(id.len()));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    if !id.bytes().all(allowed) {
        return Err(InvalidGroup::BadCharacter);
    }
    Ok(())
}
