"""Feature models: XGBoost / logistic regression on CNN feature stores, their files and presets."""
