"""The reader study (SPEC §6.5): clinicians read the selected images blind, and their answers meet the labels.

``study`` builds a study from a run's reader selection (or a CSV of images), ``db`` is its SQLite store,
``app`` is the web app readers answer in, ``analyse`` scores the answers against the labels and the models.
"""
