""" Evaluation of saved models, and accuracy under common corruptions."""
