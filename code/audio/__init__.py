"""Audio files to MERT features, as CLaMP 3's official ``preprocessing/audio/extract_mert.py`` makes them.

One job per module, in pipeline order:

* ``decode``: an audio file (WAV, MP3, FLAC, OGG) to float32 samples at its own rate, through FFmpeg
  (PyAV), MP3 encoder delay and padding removed as the official decoder removes them;
* ``resample``: the windowed-sinc resampler (Hann window, 6 zero crossings, roll-off 0.99) that the
  official code uses, written here in torch;
* ``windows``: mono, whole-file normalisation and the 5-second windows (a last window under 1 s
  dropped), numpy only;
* ``mert_model``: where the MERT weights are (``MERT_MODEL_PATH``: a folder or the Hugging Face cache,
  never downloaded unasked) and loading them strictly into transformers' HuBERT;
* ``mert_features``: ``MertExtractor``, a file's waveform and the (hidden states, windows, width)
  features of many files, windows of equal length run together;
* ``folder``: a folder of audio to a folder of ``.npy`` features (shards, resume, failure log,
  several processes), the work behind ``preprocessing/audio/extract_mert.py``.

Nothing here is imported by the symbolic tools: only audio inputs need PyAV.
"""
