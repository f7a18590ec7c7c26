"""Loaders that land public datasets as raw warehouse tables and map them onto the contract.

Each loader reads the published files as they are, writes them to raw tables, and returns
the SQL mappings (one SELECT per source) and the settings that make the nightly flow read
those tables. docs/datasets/ describes each dataset and the assumptions its mapping makes.
"""
