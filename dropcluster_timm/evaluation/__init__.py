""" Data sets and transforms, evaluation of saved models, and accuracy under common corruptions."""
