"""Pipeline runtime (programs, executor, launch); see docs/architecture.md."""
