"""The one training loop and its helpers (checkpoints, schedules, seeding)."""
