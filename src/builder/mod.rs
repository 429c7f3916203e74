//! From a Space's git repository to a pushed image: checkout, build plan, bollard build, logs.
