"""Model -> numbers: metrics, evaluation, calibration."""
