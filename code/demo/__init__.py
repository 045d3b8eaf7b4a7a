"""The offline embedded-default demo: a real pretrained text tower built without any model hub."""
