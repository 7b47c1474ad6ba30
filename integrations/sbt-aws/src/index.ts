import { IASyncFunction, IMetering, ISyncFunction } from '@cdklabs/sbt-aws';
import { Duration } from 'aws-cdk-lib';
import * as lambda from 'aws-cdk-lib/aws-lambda';
import * as secretsmanager from 'aws-cdk-lib/aws-secretsmanager';
import { Construct } from 'constructs';

export interface MeteringCoreProps {
  /**
   * A directory holding `metering_core` and the provider's packages, installed for the
   * Lambda runtime (`metering aws bundle <dir> --provider stripe`).
   * It is copied as it is: no bundling, no Docker.
   */
  readonly assetPath: string;
  /** The metering provider (`METERING_PROVIDER`): `stripe`, `http`, `sql`, … */
  readonly provider: string;
  /** Provider and library settings, as environment variables (`METERING_STRIPE_…`). */
  readonly environment?: { [name: string]: string };
  /**
   * Settings that are secrets, by variable name: each function may read them, and sets
   * the variable from Secrets Manager at cold start (e.g. `METERING_STRIPE_API_KEY`).
   */
  readonly secrets?: { [name: string]: secretsmanager.ISecret };
  /** JWT scope prefix: each route requires `<prefix><action>`. @default 'metering/' */
  readonly scopePrefix?: string;
  /** The JWT claim naming the caller's tenant. @default 'custom:tenantId' */
  readonly tenantClaim?: string;
  /** @default Duration.seconds(30) */
  readonly timeout?: Duration;
  /** @default 512 */
  readonly memorySize?: number;
}

/**
 * sbt-aws's IMetering on metering-core: one Python 3.12 Lambda function per member, the
 * request functions running the REST service (`metering_core.aws.api_handler`) behind
 * the control plane's API with a scope each, the event-triggered ones running
 * `metering_core.aws.event_handler` on its event bus.
 */
export class MeteringCore extends Construct implements IMetering {
  readonly createMeterFunction: ISyncFunction;
  readonly fetchMeterFunction: ISyncFunction;
  readonly fetchAllMetersFunction: ISyncFunction;
  readonly updateMeterFunction: ISyncFunction;
  readonly deleteMeterFunction: ISyncFunction;
  readonly fetchUsageFunction: ISyncFunction;
  readonly cancelUsageEventsFunction: ISyncFunction;
  readonly ingestUsageEventFunction: IASyncFunction;
  readonly createCustomerFunction: IASyncFunction;
  readonly deleteCustomerFunction: IASyncFunction;

  constructor(scope: Construct, id: string, props: MeteringCoreProps) {
    super(scope, id);
    const code = lambda.Code.fromAsset(props.assetPath);
    const prefix = props.scopePrefix ?? 'metering/';
    const secrets = props.secrets ?? {};
    const secretArns: { [name: string]: string } = {};
    for (const [name, secret] of Object.entries(secrets)) {
      secretArns[name] = secret.secretArn;
    }
    const environment: { [name: string]: string } = {
      ...props.environment,
      METERING_PROVIDER: props.provider,
      METERING_AWS_TENANT_CLAIM: props.tenantClaim ?? 'custom:tenantId',
    };
    if (Object.keys(secretArns).length > 0) {
      environment.METERING_SECRETS = JSON.stringify(secretArns);
    }

    const fn = (name: string, handler: string): lambda.Function => {
      const created = new lambda.Function(this, name, {
        runtime: lambda.Runtime.PYTHON_3_12,
        handler,
        code,
        timeout: props.timeout ?? Duration.seconds(30),
        memorySize: props.memorySize ?? 512,
        environment: { ...environment, METERING_OPERATION: name },
      });
      for (const secret of Object.values(secrets)) {
        secret.grantRead(created);
      }
      return created;
    };
    const api = (name: string, action: string): ISyncFunction => ({
      handler: fn(name, 'metering_core.aws.api_handler'),
      scope: `${prefix}${action}`,
    });
    const triggered = (name: string): IASyncFunction => ({
      handler: fn(name, 'metering_core.aws.event_handler'),
    }); // no trigger: sbt-aws subscribes each to its standard event

    this.createMeterFunction = api('CreateMeter', 'create_meter');
    this.fetchMeterFunction = api('FetchMeter', 'read_meter');
    this.fetchAllMetersFunction = api('FetchAllMeters', 'read_meters');
    this.updateMeterFunction = api('UpdateMeter', 'update_meter');
    this.deleteMeterFunction = api('DeleteMeter', 'delete_meter');
    this.fetchUsageFunction = api('FetchUsage', 'read_usage');
    this.cancelUsageEventsFunction = api('CancelUsageEvents', 'cancel_usage');
    this.ingestUsageEventFunction = triggered('IngestUsageEvent');
    this.createCustomerFunction = triggered('CreateCustomer');
    this.deleteCustomerFunction = triggered('DeleteCustomer');
  }
}
