"""SavedModel export for serving (placeholder until the export issue lands)."""


def make_exporters(config, class_names):
  return []


def latest_export_path(model_dir):
  return None
