"""The patch ConvNet: a tumour / non-tumour classifier of small patches from point annotations."""
