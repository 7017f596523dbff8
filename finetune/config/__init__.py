"""The config wing: schemas (every key's type and default), validation by section, the
ConfigStore and resolvers, the command line's override checks. No torch imported here."""
