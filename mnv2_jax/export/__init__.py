"""Export a trained or imported classifier to other frameworks' formats (see `export.routes`)."""

# The tensor names every graph export uses: NHWC float images in, logits out.
INPUT_NAME, OUTPUT_NAME = "images", "logits"
