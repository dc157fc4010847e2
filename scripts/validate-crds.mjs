// Validates prometheus-operator resources (ServiceMonitor, PodMonitor,
// PrometheusRule) against the operator's CRD schemas, as shipped by the npm
// package @kubernetes-models/prometheus-operator. Run by
// scripts/check-deploy.sh, which installs the packages beside a copy of it.
import fs from "node:fs";
import * as yaml from "js-yaml";
import * as v1 from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

for (const file of process.argv.slice(2)) {
  const resource = yaml.load(fs.readFileSync(file, "utf8"));
  const Kind = v1[resource.kind];
  if (resource.apiVersion !== "monitoring.coreos.com/v1" || !Kind) {
    console.error(`FAIL ${file}: not a monitoring.coreos.com/v1 kind: ${resource.apiVersion} ${resource.kind}`);
    process.exitCode = 1;
    continue;
  }
  try {
    new Kind(resource).validate();
    console.log(`ok ${file}: ${resource.kind} matches the prometheus-operator schema`);
  } catch (error) {
    console.error(`FAIL ${file}: ${error.message}`);
    process.exitCode = 1;
  }
}
