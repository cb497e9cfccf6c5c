"""Stage two: fusion heads trained on cached features (never images or encoders)."""
