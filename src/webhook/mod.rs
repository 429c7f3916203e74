//! The hub webhook receiver: a push to a Space's repository triggers a rebuild.
