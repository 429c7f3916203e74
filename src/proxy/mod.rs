//! Routes each Space's traffic, counts activity, and holds requests while a Space wakes.
