"""The run report: a static HTML page per nightly run (issue 14).  Pure builders here
(:mod:`model`, :mod:`charts`, :mod:`html`), publication in :mod:`publish`; the stage that fills
them is :mod:`deepcuts.stages.report`."""
