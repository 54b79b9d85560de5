"""Export a trained or imported classifier to other frameworks' formats (see `export.routes`)."""
