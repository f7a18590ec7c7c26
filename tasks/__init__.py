"""Pipeline stages, one module each: plain functions first, then a thin Prefect task layer."""
