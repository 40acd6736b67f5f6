"""Run folders: the files every experiment leaves behind, the plots and the Markdown report."""
