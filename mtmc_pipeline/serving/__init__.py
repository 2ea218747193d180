"""Model -> users: prediction."""
