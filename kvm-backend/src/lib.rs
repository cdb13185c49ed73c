//! KVM backend of postcopy migration.
