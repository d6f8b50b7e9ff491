//! The hub methods clients call: join and leave dispatch and contractor groups.
//!
//! Pure: turns an [`Invocation`] from an authenticated [`Principal`] into a [`HubAction`]. It
//! decides, the connection acts. Errors are worded the way an ASP.NET Core hub words them, so
//! SignalR users recognise them, with the gateway's reason added.

use publisher_lib::contract::{Group, Position};
use serde_json::Value;

use crate::auth::Principal;
use crate::auth::policy::{self, JoinRefused};
use crate::protocol::codec::Invocation;
use crate::protocol::frames;

/// What a connection must do for one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubAction {
    /// Where to send the Completion; `None` for a non-blocking call (nothing is sent back).
    pub invocation_id: Option<String>,
    /// The decision.
    pub outcome: Outcome,
}

/// The decision for one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Add the connection to the group, send what it missed after `after`, then complete with
    /// the group's position.
    Join {
        /// The group.
        group: Group,
        /// The last position the client saw, to resume from.
        after: Option<Position>,
    },
    /// Remove the connection from the group, then complete.
    Leave(Group),
    /// Complete with this error; the connection stays open.
    Error(HubError),
}

/// The hub's methods. Names match case-insensitively, as ASP.NET Core matches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `JoinDispatchGroup(region)`.
    JoinDispatchGroup,
    /// `LeaveDispatchGroup(region)`.
    LeaveDispatchGroup,
    /// `JoinContractorGroup(contractorId)`.
    JoinContractorGroup,
    /// `LeaveContractorGroup(contractorId)`.
    LeaveContractorGroup,
}

/// Why an invocation failed. The connection stays usable after every one of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// No hub method has this name.
    #[error(
        "Failed to invoke '{0}' due to an error on the server. HubException: Method does not exist."
    )]
    UnknownMethod(String),
    /// Not the number of arguments the method takes.
    #[error(
        "Failed to invoke '{method}' due to an error on the server. InvalidDataException: Invocation provides {got} argument(s) but target expects {expected}."
    )]
    ArgumentCount {
        /// The method's canonical name.
        method: &'static str,
        /// How many arguments came.
        got: usize,
        /// What the method takes, in words.
        expected: &'static str,
    },
    /// The position argument is not `{"epoch": string, "seq": number}` or null.
    #[error(
        "Failed to invoke '{0}' due to an error on the server. InvalidDataException: Error binding arguments. The position must be null or {{\"epoch\": string, \"seq\": integer}}."
    )]
    PositionType(&'static str),
    /// The argument is not a string.
    #[error(
        "Failed to invoke '{0}' due to an error on the server. InvalidDataException: Error binding arguments. The argument must be a string."
    )]
    ArgumentType(&'static str),
    /// A StreamInvocation (type 4) for a method that does not stream.
    #[error(
        "The client attempted to invoke the non-streaming '{0}' method with a streaming invocation."
    )]
    NotStreaming(&'static str),
    /// Client-to-server streams for a method that takes none.
    #[error("Client sent {got} stream(s), Hub method expects 0.")]
    UnexpectedStreams {
        /// How many stream ids came.
        got: usize,
    },
    /// The join rules refused the call.
    #[error("{}", frames::hub_exception(method, reason))]
    Refused {
        /// The method's canonical name.
        method: &'static str,
        /// Why.
        reason: JoinRefused,
    },
}

impl HubError {
    /// Low-cardinality label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::UnknownMethod(_) => "unknown_method",
            Self::ArgumentCount { .. } | Self::ArgumentType(_) | Self::PositionType(_) => {
                "bad_arguments"
            }
            Self::NotStreaming(_) | Self::UnexpectedStreams { .. } => "streaming",
            Self::Refused { reason, .. } => reason.label(),
        }
    }
}

impl Method {
    const ALL: [Method; 4] = [
        Method::JoinDispatchGroup,
        Method::LeaveDispatchGroup,
        Method::JoinContractorGroup,
        Method::LeaveContractorGroup,
    ];

    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Self::JoinDispatchGroup => "JoinDispatchGroup",
            Self::LeaveDispatchGroup => "LeaveDispatchGroup",
            Self::JoinContractorGroup => "JoinContractorGroup",
            Self::LeaveContractorGroup => "LeaveContractorGroup",
        }
    }

    /// The method called `target`, ignoring ASCII case.
    pub fn from_target(target: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(target))
    }
}

/// Decides what to do with one invocation from `principal`.
pub fn handle(principal: &Principal, invocation: &Invocation) -> HubAction {
    HubAction {
        invocation_id: invocation.invocation_id.clone(),
        outcome: decide(principal, invocation).unwrap_or_else(Outcome::Error),
    }
}

fn decide(principal: &Principal, invocation: &Invocation) -> Result<Outcome, HubError> {
    let method = Method::from_target(&invocation.target)
        .ok_or_else(|| HubError::UnknownMethod(invocation.target.clone()))?;
    if invocation.streaming {
        return Err(HubError::NotStreaming(method.name()));
    }
    if !invocation.stream_ids.is_empty() {
        return Err(HubError::UnexpectedStreams {
            got: invocation.stream_ids.len(),
        });
    }
    let joins = matches!(
        method,
        Method::JoinDispatchGroup | Method::JoinContractorGroup
    );
    let (argument, position) = match (invocation.arguments.as_slice(), joins) {
        ([argument], _) => (argument, None),
        ([argument, position], true) => (argument, Some(position)),
        (arguments, _) => {
            return Err(HubError::ArgumentCount {
                method: method.name(),
                got: arguments.len(),
                expected: if joins { "1 or 2" } else { "1" },
            });
        }
    };
    let after = match position {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            serde_json::from_value::<Position>(value.clone())
                .map_err(|_| HubError::PositionType(method.name()))?,
        ),
    };
    let Value::String(id) = argument else {
        return Err(HubError::ArgumentType(method.name()));
    };
    let refused = |reason| HubError::Refused {
        method: method.name(),
        reason,
    };
    Ok(match method {
        Method::JoinDispatchGroup => Outcome::Join {
            group: policy::may_join_dispatch(principal, id).map_err(refused)?,
            after,
        },
        Method::JoinContractorGroup => Outcome::Join {
            group: policy::may_join_contractor(principal, id).map_err(refused)?,
            after,
        },
        Method::LeaveDispatchGroup => {
            Outcome::Leave(Group::try_dispatch(id).map_err(|reason| {
                refused(JoinRefused::InvalidName {
                    what: "region",
                    reason,
                })
            })?)
        }
        Method::LeaveContractorGroup => {
            Outcome::Leave(Group::try_contractor(id).map_err(|reason| {
                refused(JoinRefused::InvalidName {
                    what: "contractor id",
                    reason,
                })
            })?)
        }
    })
}

#[cfg(test)]
#[path = "hub_tests.rs"]
mod tests;
