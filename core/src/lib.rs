//! Sans-IO core of postcopy live migration.
