"""Collecting preferences: pairs from policy samples (pairs), assignment policy (assign),
targeted re-rating (rerate) and calibration workshops (workshop), all through the store."""
