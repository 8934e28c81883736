//! duet device models, shared by every backend
