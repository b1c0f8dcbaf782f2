"""Evaluation shared by every model kind: grouped folds, voting, cross-validation, metrics, reports."""
