"""mode_ros.data: recorded demonstrations -> one episode format -> training windows. ROS-free.

Modules (imported on demand; none imports rclpy, only ``dataset`` imports torch):
  images         decode_image / decode_compressed / encode_image (shared with the ROS node)
  episodes       EpisodeWriter / EpisodeReader: robomimic/LIBERO-style HDF5 (docs/DATA.md)
  topic_map      the YAML topic map of ``mode-ros convert bag`` (typed, validated)
  bag            convert_bags: rosbag2 (.db3/.mcap) -> episodes, resampled onto the control clock
  hdf5_import    import_hdf5: LIBERO/robomimic files -> episodes
  lerobot        LeRobot layouts (v2.1/v3.0), the key map, mp4 IO (PyAV); lerobot_import / lerobot_export:
                 import_lerobot (datasets -> episodes), export_lerobot (episodes or bags -> v3.0);
                 lerobot_bench: codec and conversion speed (a measurement command)
  normalization  Stats, ActionNormalizer/StateNormalizer ([-1, 1]), normalization.json
  dataset        EpisodeWindowDataset (1 obs + chunk_size actions), random_shift (DrQ-v2)
  rosmsgs        ActionChunk definition + rosbags typestore (ROS 2 Kilted/Jazzy types)
  synthetic      a synthetic demo bag + conversion benchmark
  cli            ``mode-ros convert bag|hdf5|lerobot`` (lerobot_cli: ``convert lerobot``, ``export lerobot``)
"""
