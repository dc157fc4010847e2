-- Once per connection: which server this is, so that two targets that
-- reach one server are refused. The postmaster's start time and data
-- directory tell servers apart even where they share a system identifier
-- (a standby and its primary, clusters copied from one initdb); the data
-- directory needs pg_read_all_settings (part of pg_monitor), else NULL
-- (current_setting would fail, not answer NULL, without it).
SELECT pg_catalog.pg_postmaster_start_time() AS started,
       CASE WHEN pg_catalog.pg_has_role('pg_read_all_settings', 'USAGE')
            THEN pg_catalog.current_setting('data_directory')
       END AS data_directory
