"""The four nouns: Config, Delta, Site, DeltaModel; plus targeting and the method registry."""
